"""What a run leaves in its workdir: metrics.jsonl, TensorBoard events, PNG image grids.

Only process 0 writes, so multi-host runs produce one copy.

metrics.jsonl survives kills. A kill can cut the last row short (no newline, not JSON):
readers (`read_metrics`, so `flaxvae report` and the Python API) skip such a line with a
warning, and a resumed run drops it, with a warning, before it appends (never onto it). A run
killed after its last checkpoint logged rows past it that the resumed run logs again: the
resume marks those rows (step > the resumed step; every row when it starts from step 0)
`"superseded": true`, rewriting the file atomically, and readers skip them, so each step's
row appears once and a report draws one trajectory. TensorBoard gets the same through
`SummaryWriter(purge_step=...)`: the resumed run first writes a SessionLog START event at
the resumed step + 1, and TensorBoard, on reading it, discards the events of that run
(tensorboard/ folder) with a step at or beyond it that came before it in the event files; the
files themselves keep them.
"""

import json
import logging
import math
import os

import jax
import numpy as np
import PIL.Image
from tensorboardX import SummaryWriter  # writes event files without TensorFlow

from flaxvae.errors import OutputError, one_line

log = logging.getLogger("flaxvae")
METRICS_FILE = "metrics.jsonl"


def is_writer():
  return jax.process_index() == 0


class MetricWriter:
  """Appends one JSON object per row to metrics.jsonl and mirrors scalars to TensorBoard."""

  def __init__(self, workdir, resumed_from):
    """`resumed_from`: the step a (re)started run continues from (0 from scratch); rows and
    TensorBoard events logged beyond it by an earlier, killed run are superseded."""
    self.path = os.path.join(workdir, METRICS_FILE)
    self._tb = None
    if is_writer():
      events, purge_step = os.path.join(workdir, "tensorboard"), None
      settle_metrics(self.path, resumed_from)
      if resumed_from or (os.path.isdir(events) and os.listdir(events)):
        purge_step = resumed_from + 1 if resumed_from else 0
      self._tb = SummaryWriter(events, flush_secs=30, purge_step=purge_step)

  def write(self, step, row, split="train"):
    if not is_writer():
      return
    row = {"step": int(step), "split": split, **{k: _plain(v) for k, v in row.items()}}
    try:
      with open(self.path, "a") as f:
        f.write(json.dumps(row) + "\n")
    except OSError as e:
      raise OutputError(
        f"could not write step {step}'s metrics to {self.path}: "
        f"{e.strerror or e}. Free space or fix permissions, then rerun the same "
        "command: it resumes from the last checkpoint"
      ) from None
    for key, value in row.items():
      if key not in ("step", "split") and isinstance(value, (int, float)):
        self._tb.add_scalar(f"{split}/{key}", value, step)

  def close(self):
    if self._tb is not None:
      self._tb.close()


def _plain(value):
  value = np.asarray(value).item() if np.ndim(value) == 0 else np.asarray(value).tolist()
  return round(value, 6) if isinstance(value, float) else value


def _parse(text):
  """[(line number, row or None when the line is not one complete JSON object)] of the
  non-blank lines of metrics.jsonl's `text`."""
  parsed = []
  for number, line in enumerate(text.split("\n"), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except ValueError:
      row = None
    parsed.append((number, line, row if isinstance(row, dict) else None))
  return parsed


def _torn_warning(path, numbers, action):
  lines = ", ".join(map(str, numbers[:10])) + (" ..." if len(numbers) > 10 else "")
  log.warning(
    "%s: %s (a write cut short by a kill?): %s",
    path,
    f"line {lines} is not a complete JSON row"
    if len(numbers) == 1
    else f"lines {lines} are not complete JSON rows",
    action,
  )


def settle_metrics(path, resumed_from):
  """Readies metrics.jsonl for a run resuming from step `resumed_from` (0: from scratch): a torn
  last line (a write a kill cut short) is dropped and rows logged past that step are marked
  superseded, with a warning each; the file is rewritten atomically (temporary file, then
  rename), and only if needed. An unparseable line before the last is kept as it is (readers
  skip it with a warning): only the last line can be a write in progress."""
  try:
    with open(path) as f:
      text = f.read()
  except FileNotFoundError:
    return
  except OSError as e:
    raise OutputError(
      f"could not read {path}: {e.strerror or one_line(e)}. Fix permissions, "
      "then rerun the same command"
    ) from None
  kept, torn, superseded = [], [], 0
  parsed = _parse(text)
  for number, line, row in parsed:
    if row is None and number == parsed[-1][0]:
      torn.append(number)
    elif row is None:
      kept.append(line)
    elif not row.get("superseded") and (resumed_from == 0 or row.get("step", 0) > resumed_from):
      kept.append(json.dumps(dict(row, superseded=True)))
      superseded += 1
    else:
      kept.append(line)
  if not torn and not superseded and (text.endswith("\n") or not text):
    return
  if torn:
    _torn_warning(path, torn, "dropped before this run appends")
  if superseded:
    log.warning(
      "%s: %d row(s) logged %s by an earlier run marked superseded, as this run "
      "logs those steps again",
      path,
      superseded,
      f"after step {resumed_from}" if resumed_from else "before this run started from step 0",
    )
  temporary = f"{path}.tmp-{os.getpid()}"
  try:
    with open(temporary, "w") as f:
      f.write("".join(line + "\n" for line in kept))
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
  except OSError as e:
    raise OutputError(
      f"could not rewrite {path}: {e.strerror or one_line(e)}. Free space or "
      "fix permissions, then rerun the same command"
    ) from None


def read_metrics(workdir, superseded=False):
  """The rows of metrics.jsonl (empty if the run has not logged yet). Lines that are not
  complete JSON rows (a kill mid-write) are skipped with a warning, and rows a resumed run
  superseded are left out unless `superseded`."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    parsed = _parse(f.read())
  torn = [number for number, _, row in parsed if row is None]
  if torn:
    _torn_warning(path, torn, "skipped")
  return [
    row for _, _, row in parsed if row is not None and (superseded or not row.get("superseded"))
  ]


def read_json(path, what):
  """The JSON object in `path`; None (with a warning naming `what` is left out) when the file
  is absent, unreadable or not a JSON object."""
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      value = json.load(f)
    if isinstance(value, dict):
      return value
    reason = f"it holds {type(value).__name__}, not a JSON object"
  except (OSError, ValueError) as e:
    reason = one_line(e, 120)
  log.warning("%s is unreadable (%s): %s is left out", path, reason, what)
  return None


def image_grid(images, columns=None):
  """[n, H, W, C] floats in [0, 1] -> one uint8 [rows*H, cols*W, C] tiled image."""
  images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
  n, h, w, c = images.shape
  columns = columns or math.ceil(math.sqrt(n))
  rows = math.ceil(n / columns)
  grid = np.ones((rows * (h + 1) + 1, columns * (w + 1) + 1, c), np.float32)
  for i, image in enumerate(images):
    r, col = divmod(i, columns)
    grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + col * (w + 1) : 1 + col * (w + 1) + w] = image
  return (grid * 255).round().astype(np.uint8)


def save_image_grid(path, images, columns=None):
  if not is_writer():
    return
  grid = image_grid(images, columns)
  PIL.Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
