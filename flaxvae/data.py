"""Training data: a prepared split held in memory, and the order examples are drawn in.

The example order is a pure function of (seed, epoch): epoch e visits the split
in `epoch_permutation(seed, e, n)` order and batches run on across epoch
boundaries. The trainer keeps the images on device and sends only indices, so
the host never copies pixels in the hot loop.
"""
import dataclasses

import numpy as np

from flaxvae.models import ConfigError


def load_images(data_config, split):
  """uint8 images [N, H, W, C] of `split`, preparing the dataset first when needed."""
  if data_config.name != "fashion_mnist":
    raise ConfigError(f"unknown data.name {data_config.name!r}: this build knows fashion_mnist")
  from flaxvae import datasets
  builder_dir = datasets.prepare_fashion_mnist(data_config.source_dir or None,
                                               data_config.data_dir or None)
  images, _ = datasets.load_split(builder_dir, split)
  return images


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
    return cls(**{k: int(v) for k, v in state.items()})
