"""The user's pages (README.md and docs/*.md) stay true to the tree they ship with.

Documentation rots silently: a moved file, a renamed heading, a removed command or flag, a
config key that no longer exists. These tests read the pages as a user would follow them:
every relative link (and #anchor) resolves, every `flaxvae` command shown names a subcommand
whose `--help` works and flags that subcommand defines, every `--config.KEY` shown beside a
config file is a key of that config, and every `configs/*.py` named exists.
"""

import contextlib
import importlib.util
import io
import pathlib
import re
import shlex

import pytest

from flaxvae import defaults
from flaxvae.cli import main

REPO = pathlib.Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
COMMAND = re.compile(r"(?:^|(?<=[\s/]))flaxvae\s+([a-z][\w-]*)(.*)")
HELP_FLAG = re.compile(r"^\s+(?:-\w,)?--(?:\[no\])?([\w.]+):", re.M)
CONFIG_FILE = re.compile(r"configs/(?![A-Z]+\.py)[\w.-]+\.py")  # configs/NAME.py: a placeholder


def _page_id(path):
  return str(path.relative_to(REPO))


def _slug(heading):
  """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
  text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
  return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path):
  anchors, seen = set(), {}
  text = FENCE.sub("", path.read_text())
  for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", text, re.M):
    slug = _slug(heading)
    anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
    seen[slug] = seen.get(slug, 0) + 1
  return anchors


def _code(text):
  """The code a page shows: lines of fenced blocks, then inline code spans of the prose."""
  blocks = FENCE.findall(text)
  lines = [line for block in blocks for line in block.splitlines()]
  return lines + INLINE_CODE.findall(FENCE.sub("", text))


def _commands():
  """(page, subcommand, its argument words) for every `flaxvae SUBCOMMAND ...` shown."""
  shown = []
  for page in PAGES:
    for line in _code(page.read_text()):
      for match in COMMAND.finditer(line):
        rest = re.split(r"\s#|\s\||;|&&", match.group(2))[0]
        try:
          words = shlex.split(rest)
        except ValueError:  # an unbalanced quote in prose-like code: keep the words we can
          words = rest.split()
        shown.append((_page_id(page), match.group(1), words))
  return shown


def test_every_page_is_checked():
  assert {p.name for p in PAGES} >= {
    "README.md",
    "architecture.md",
    "configuration.md",
    "models.md",
    "evaluation.md",
    "scaling.md",
    "checkpoints.md",
    "performance.md",
    "posterior.md",
  }


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_relative_links_resolve(page):
  broken = []
  for target in LINK.findall(page.read_text()):
    if re.match(r"[a-z][\w+.-]*:", target):  # http:, https:, mailto:
      continue
    path, _, anchor = target.partition("#")
    resolved = (page.parent / path).resolve() if path else page
    if not resolved.exists():
      broken.append(f"{target}: no such file")
    elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
      broken.append(f"{target}: no heading with anchor #{anchor}")
  assert not broken, f"{_page_id(page)}: {broken}"


def test_config_files_named_exist():
  missing = sorted(
    {
      (_page_id(page), name)
      for page in PAGES
      for name in CONFIG_FILE.findall(page.read_text())
      if not (REPO / name).exists()
    }
  )
  assert not missing, f"config files that do not exist: {missing}"


def _help(subcommand):
  """The flags `flaxvae SUBCOMMAND --help` lists (in-process: the CLI's own parser)."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    try:
      status = main(["flaxvae", subcommand, "--help"])
    except SystemExit as e:
      status = e.code
  assert status in (0, None), f"`flaxvae {subcommand} --help` exits with status {status}"
  return set(HELP_FLAG.findall(out.getvalue()))


def test_commands_shown_parse():
  """Each subcommand shown has a working --help that lists every flag the pages give it."""
  commands = _commands()
  assert {sub for _, sub, _ in commands} >= {"train", "evaluate", "sample", "report", "bench"}
  flags_of = {sub: _help(sub) for sub in sorted({sub for _, sub, _ in commands})}
  unknown = []
  for page, sub, words in commands:
    for word in words:
      name = word.lstrip("[").split("=")[0].rstrip("]")
      if (
        name.startswith("--")
        and not name.startswith("--config.")
        and (name[2:] not in flags_of[sub])
      ):
        unknown.append(f"{page}: flaxvae {sub} {name}")
  assert not unknown, f"flags no subcommand defines: {unknown}"


def _load_config(spec):
  path, _, arg = spec.partition(":")
  return defaults.load_config_file(str(REPO / path), arg or None)


def _has_key(config, dotted):
  node = config
  for part in dotted.split("."):
    if part not in node:
      return False
    node = node[part]
  return True


def test_config_overrides_shown_are_keys_of_their_config():
  """`--config.KEY=VALUE` beside `--config FILE` names a key FILE's config has."""
  unknown = []
  for page, _, words in _commands():
    spec = next((b for a, b in zip(words, words[1:]) if a == "--config"), None)
    if spec is None or not CONFIG_FILE.fullmatch(spec.partition(":")[0]):
      continue
    config = _load_config(spec)
    for word in words:
      if word.startswith("--config."):
        key = word[len("--config.") :].split("=")[0]
        if not _has_key(config, key):
          unknown.append(f"{page}: {spec} has no key {key}")
  assert not unknown, f"config keys that do not exist: {unknown}"


def test_equal_wall_time_figure_draws_every_row(tmp_path, monkeypatch):
  """docs/figures/quality_nll_vs_wall.png (benchmarks/results.py) has a mark for every row of
  RESULTS.md's equal-wall-time table, in its protocol's panel: rows whose curves were lost
  still appear by their final evaluation. It reads the records git keeps (stored_record):
  results.record would rewrite them from any run dir present, and a test must not."""
  spec = importlib.util.spec_from_file_location("results", REPO / "benchmarks" / "results.py")
  results = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(results)
  monkeypatch.setattr(results, "record", results.stored_record)
  drawn = []
  monkeypatch.setattr(results.report.plt, "close", drawn.append)
  results.quality_figure(str(tmp_path / "quality.png"))
  panels = [{line.get_label().split(":")[0] for line in ax.lines} for ax in drawn[0].axes]
  for name in results.QUALITY:
    if results.record("quality", name) is not None:
      assert name.split("_")[0] in panels["8bit" in name], f"{name} is not drawn"


def test_headline_figures_are_in_the_files_they_cite():
  """Each figure of the README's headline table is in the generated file its row links to, so
  a regenerated RESULTS.md or BENCHMARKS.md cannot leave the README quoting an old figure."""
  text = (REPO / "README.md").read_text()
  table = text.split("## Headline results", 1)[1].split("\n## ", 1)[0]
  stale = []
  for row in (line for line in table.splitlines() if line.startswith("| ") and "](" in line):
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    cited = (REPO / LINK.search(cells[-1]).group(1).partition("#")[0]).read_text()
    stale += [
      f"{cells[0]}: {figure}" for figure in re.findall(r"\d+\.\d+", cells[1]) if figure not in cited
    ]
  assert not stale, f"headline figures not in the file they cite: {stale}"
