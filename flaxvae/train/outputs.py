"""What a run leaves in its workdir: metrics.jsonl, TensorBoard events, PNG image grids.

Only process 0 writes, so multi-host runs produce one copy.
"""
import json
import math
import os

import jax
import numpy as np
import PIL.Image
from tensorboardX import SummaryWriter  # writes event files without TensorFlow

from flaxvae.errors import OutputError


def is_writer():
  return jax.process_index() == 0


class MetricWriter:
  """Appends one JSON object per row to metrics.jsonl and mirrors scalars to TensorBoard."""

  def __init__(self, workdir):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if is_writer():
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=30)

  def write(self, step, row, split="train"):
    if not is_writer():
      return
    row = {"step": int(step), "split": split, **{k: _plain(v) for k, v in row.items()}}
    try:
      with open(self.path, "a") as f:
        f.write(json.dumps(row) + "\n")
    except OSError as e:
      raise OutputError(f"could not write step {step}'s metrics to {self.path}: "
                        f"{e.strerror or e}. Free space or fix permissions, then rerun the same "
                        "command: it resumes from the last checkpoint") from None
    for key, value in row.items():
      if key not in ("step", "split") and isinstance(value, (int, float)):
        self._tb.add_scalar(f"{split}/{key}", value, step)

  def close(self):
    if self._tb is not None:
      self._tb.close()


def _plain(value):
  value = np.asarray(value).item() if np.ndim(value) == 0 else np.asarray(value).tolist()
  return round(value, 6) if isinstance(value, float) else value


def read_metrics(workdir):
  """The rows of metrics.jsonl (empty if the run has not logged yet)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def image_grid(images, columns=None):
  """[n, H, W, C] floats in [0, 1] -> one uint8 [rows*H, cols*W, C] tiled image."""
  images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
  n, h, w, c = images.shape
  columns = columns or math.ceil(math.sqrt(n))
  rows = math.ceil(n / columns)
  grid = np.ones((rows * (h + 1) + 1, columns * (w + 1) + 1, c), np.float32)
  for i, image in enumerate(images):
    r, col = divmod(i, columns)
    grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = image
  return (grid * 255).round().astype(np.uint8)


def save_image_grid(path, images, columns=None):
  if not is_writer():
    return
  grid = image_grid(images, columns)
  PIL.Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
