"""Training data: a prepared split held in memory, and the order examples are drawn in.

The example order is a pure function of (seed, epoch): epoch e visits the split
in `epoch_permutation(seed, e, n)` order and batches run on across epoch
boundaries. The trainer keeps the images on device and sends only indices, so
the host never copies pixels in the hot loop.
"""
import dataclasses

import numpy as np

from flaxvae.models import ConfigError


PIPELINES = ("auto", "in_memory", "streaming")


def load_images(data_config, split):
  """uint8 images [N, H, W, C] of `split`, preparing Fashion-MNIST first when needed."""
  if data_config.name == "fashion_mnist":
    from flaxvae import datasets
    builder_dir = datasets.prepare_fashion_mnist(data_config.source_dir or None,
                                                 data_config.data_dir or None)
    images, _ = datasets.load_split(builder_dir, split)
    return images
  from flaxvae import records
  return records.open_split(data_config, split).read_all()


def choose_pipeline(data_config, split):
  """"in_memory" or "streaming" for `split`: data.pipeline, or by size when it is "auto".

  The size of the catalog's splits is known without opening them, so the common case reads
  nothing here (and tests that replace `load_images` never touch disk).
  """
  choice = data_config.get("pipeline", "auto")
  if choice not in PIPELINES:
    raise ConfigError(f"unknown data.pipeline {choice!r}: use {', '.join(PIPELINES)}")
  if choice != "auto":
    return choice
  from flaxvae import records
  nbytes = records.static_split_bytes(data_config, split)
  if nbytes is None:
    nbytes = records.open_split(data_config, split).nbytes
  return "in_memory" if nbytes <= data_config.get("in_memory_max_bytes", 1 << 30) else "streaming"


def epoch_permutation(seed, epoch, num_examples):
  """The order of epoch `epoch`: the same on every process, path and device count."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


@dataclasses.dataclass
class IndexStream:
  """Endless shuffled example indices; its position is the data state a checkpoint keeps."""
  num_examples: int
  seed: int
  epoch: int = 0
  position: int = 0  # examples of `epoch` already handed out

  def __post_init__(self):
    self._order = epoch_permutation(self.seed, self.epoch, self.num_examples)

  def take(self, count):
    """The next `count` indices, continuing into the next epoch when this one runs out."""
    parts = []
    while count:
      n = min(count, self.num_examples - self.position)
      parts.append(self._order[self.position:self.position + n])
      self.position += n
      count -= n
      if self.position == self.num_examples:
        self.epoch, self.position = self.epoch + 1, 0
        self._order = epoch_permutation(self.seed, self.epoch, self.num_examples)
    return np.concatenate(parts).astype(np.int32) if parts else np.zeros((0,), np.int32)

  def state(self):
    return {"num_examples": self.num_examples, "seed": self.seed,
            "epoch": self.epoch, "position": self.position}

  @classmethod
  def from_state(cls, state):
    """From either pipeline's state: both keep num_examples, seed, epoch and position."""
    return cls(**{k: int(state[k]) for k in ("num_examples", "seed", "epoch", "position")})
