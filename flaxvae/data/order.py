"""The order training examples are drawn in: a pure function of (seed, epoch).

Epoch e visits the split in `epoch_permutation(seed, e, n)` order and batches run on across
epoch boundaries, on every process, path and device count. Its position is the data state a
checkpoint keeps.
"""

import dataclasses

import numpy as np


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
      parts.append(self._order[self.position : self.position + n])
      self.position += n
      count -= n
      if self.position == self.num_examples:
        self.epoch, self.position = self.epoch + 1, 0
        self._order = epoch_permutation(self.seed, self.epoch, self.num_examples)
    return np.concatenate(parts).astype(np.int32) if parts else np.zeros((0,), np.int32)

  def state(self):
    return {
      "num_examples": self.num_examples,
      "seed": self.seed,
      "epoch": self.epoch,
      "position": self.position,
    }

  @classmethod
  def from_state(cls, state):
    """From either pipeline's state: both keep num_examples, seed, epoch and position."""
    return cls(**{k: int(state[k]) for k in ("num_examples", "seed", "epoch", "position")})
