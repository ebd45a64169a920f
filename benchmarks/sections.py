"""Sections of BENCHMARKS.md that a script other than report.py owns and rewrites on each run
(aot_autoencoder.py's ahead-of-time table, device_check.py's accelerator rows).

report.py writes the whole file; it keeps these sections as they were written (`kept`), so
`make bench` never drops the figures of a device it cannot reach. Each section carries its
own raw rows in a json block, so its script can merge a partial run into what was measured.
"""

import json
import os

RAW_HEADING = "## Raw results"
# Headings of the sections other scripts own (each is matched as a prefix).
OWNED = ("## AOT: the latent KL autoencoder", "## Device check")


def _split(lines):
  """[(heading or None, lines)] of a markdown file's level-2 sections, in order."""
  parts = [(None, [])]
  for line in lines:
    if line.startswith("## "):
      parts.append((line, []))
    parts[-1][1].append(line)
  return parts


def _read(path):
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return f.read().splitlines()


def read(path, heading):
  """The lines of the section whose heading starts with `heading`, or []."""
  return next((body for h, body in _split(_read(path)) if h and h.startswith(heading)), [])


def kept(path):
  """Every owned section of `path`, in order (report.py writes them back unchanged)."""
  out = []
  for h, body in _split(_read(path)):
    if h and h.startswith(OWNED):
      out += body if not body or body[-1] == "" else [*body, ""]
  return out


def write(path, heading, lines):
  """Replaces the section whose heading starts with `heading` by `lines` (heading included);
  a new section goes before the raw results (or at the end)."""
  parts = _split(_read(path))
  body = [*lines, *([""] if lines and lines[-1] != "" else [])]
  at = next((i for i, (h, _) in enumerate(parts) if h and h.startswith(heading)), None)
  if at is None:
    at = next((i for i, (h, _) in enumerate(parts) if h == RAW_HEADING), len(parts))
    parts.insert(at, (heading, body))
  else:
    parts[at] = (heading, body)
  with open(path, "w") as f:
    f.write("\n".join(line for _, part in parts for line in part).rstrip("\n") + "\n")


def raw_rows(lines):
  """The JSON rows of a section's ```json block."""
  return [json.loads(line) for line in lines if line.startswith("{")]


def raw_block(rows):
  return ["```json", *[json.dumps(r) for r in rows], "```"]


def table(header, rows):
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
