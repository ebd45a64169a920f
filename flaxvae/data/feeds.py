"""The two input pipelines the trainer can run, behind one small "feed" interface.

* in_memory: the train split lives on every device; a dispatch sends only example indices
  (`data.IndexStream`) and the step gathers the images on device. Fastest when the split fits.
* streaming: Grain reads this process's share of every global batch from the prepared
  ArrayRecord files in background threads; a dispatch sends uint8 batches [n, local, H, W, C]
  placed with `make_array_from_process_local_data`. For splits too large to keep on device.

Both visit examples in exactly the order `data.epoch_permutation(seed, epoch, n)` gives, with
batches running on across epoch boundaries, and process p takes columns [p*local, (p+1)*local)
of every global batch. So switching paths (or resuming one from the other's checkpoint) keeps
the run's data order. `feed.state()` is the JSON a checkpoint's `data` item holds.
"""

import threading

import grain
import jax
import numpy as np

from flaxvae.data import order
from flaxvae.errors import DataError
from flaxvae.runtime import parallel

MAX_INDEX = 2**62  # "endless": Grain's MapDataset needs a length; batch ids never get near this


def check_batch_size(batch_size, num_examples, process_count, split="train"):
  """Refuses a global batch each process cannot fill from its share of the split."""
  if batch_size % process_count:
    raise DataError(
      f"batch_size {batch_size} does not split over {process_count} processes: "
      f"use a multiple of {process_count}"
    )
  local = batch_size // process_count
  if batch_size > num_examples:
    raise DataError(
      f"batch_size {batch_size} ({local} per process x {process_count} processes) "
      f"is larger than split {split!r} ({num_examples} examples, "
      f"{num_examples // process_count} per process): lower batch_size"
    )
  return local


class _LocalBatchIds(grain.MapDataset):
  """Element b: the example ids this process reads for global batch b, in trainer order."""

  def __init__(self, num_examples, seed, batch_size, lo, hi):
    super().__init__()
    self.num_examples, self.seed, self.batch_size, self.lo, self.hi = (
      num_examples,
      seed,
      batch_size,
      lo,
      hi,
    )
    self._orders, self._lock = {}, threading.Lock()

  def __len__(self):
    return MAX_INDEX

  def _order(self, epoch):
    with self._lock:
      if epoch not in self._orders:
        if len(self._orders) > 4:  # threads read a few batches apart: keep recent epochs only
          self._orders.pop(min(self._orders))
        self._orders[epoch] = order.epoch_permutation(self.seed, epoch, self.num_examples)
      return self._orders[epoch]

  def __getitem__(self, b):
    if isinstance(b, slice):
      return self.slice(b)
    positions = b * self.batch_size + np.arange(self.lo, self.hi, dtype=np.int64)
    epochs, within = np.divmod(positions, self.num_examples)
    ids = np.empty(len(positions), np.int64)
    for epoch in np.unique(epochs):
      at = epochs == epoch
      ids[at] = self._order(int(epoch))[within[at]]
    return ids


class StreamingBatches:
  """This process's uint8 batches [local, H, W, C] of `split`, read ahead by Grain threads."""

  def __init__(
    self,
    split,
    seed,
    batch_size,
    *,
    process_index=None,
    process_count=None,
    read_threads=2,
    prefetch_batches=64,
    start_batch=0,
  ):
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    self.split, self.seed, self.batch_size = split, seed, batch_size
    self.num_examples = split.num_examples
    self.local = check_batch_size(batch_size, self.num_examples, process_count, split.split)
    lo = process_index * self.local
    ids = _LocalBatchIds(self.num_examples, seed, batch_size, lo, lo + self.local)
    dataset = ids.map(split.read).to_iter_dataset(
      grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_batches)
    )
    self._iterator = iter(dataset)
    if start_batch:
      self._iterator.set_state({"next_index": int(start_batch)})

  def _next_batch(self):
    return self._iterator.get_state()["next_index"]

  @property
  def epoch(self):
    return self._next_batch() * self.batch_size // self.num_examples

  @property
  def position(self):
    return self._next_batch() * self.batch_size % self.num_examples

  def take(self, n):
    """The next n batches, stacked: uint8 [n, local, H, W, C]."""
    return np.stack([next(self._iterator) for _ in range(n)])

  def state(self):
    return {
      "pipeline": "streaming",
      "num_examples": self.num_examples,
      "seed": self.seed,
      "epoch": self.epoch,
      "position": self.position,
      "grain": self._iterator.get_state(),
    }

  @classmethod
  def from_state(cls, state, split, batch_size, **kwargs):
    """Resumes at the exact next batch; also from an in-memory run's state (same order)."""
    _check_resumable(state, split.num_examples)
    consumed = int(state["epoch"]) * split.num_examples + int(state["position"])
    if consumed % batch_size:
      raise DataError(
        f"the checkpoint's data position ({consumed} examples) is not a whole "
        f"number of batches of {batch_size}: resume with the batch_size it used"
      )
    return cls(split, int(state["seed"]), batch_size, start_batch=consumed // batch_size, **kwargs)


def _check_resumable(state, num_examples):
  if int(state["num_examples"]) != num_examples:
    raise DataError(
      f"the checkpoint was taken on a split of {state['num_examples']} examples, "
      f"this one has {num_examples}: resume with the same data.name and split"
    )


# ----------------------------------------------------------------------------
# Feeds: what the trainer's loop calls, one per path.
# ----------------------------------------------------------------------------
class InMemoryFeed:
  """Indices per dispatch into the device-resident split; the step gathers each batch on device."""

  name = "in_memory"
  gathers = True  # the train function takes (dataset, indices) and gathers on device
  arg_kinds = (parallel.REPLICATED, parallel.batch_axis(1))

  def __init__(self, runner, images, batch_size, stream):
    self.runner, self.batch_size, self.stream = runner, batch_size, stream
    local = check_batch_size(batch_size, len(images), jax.process_count())
    self.lo, self.hi = jax.process_index() * local, (jax.process_index() + 1) * local
    self.images = runner.put(images)

  def args(self, n):
    indices = self.stream.take(n * self.batch_size).reshape(n, self.batch_size)[
      :, self.lo : self.hi
    ]
    return self.images, self.runner.put(indices, parallel.batch_axis(1))

  @property
  def epoch(self):
    return self.stream.epoch + self.stream.position / self.stream.num_examples

  def state(self):
    return dict(self.stream.state(), pipeline=self.name)


class StreamingFeed:
  """uint8 batches per dispatch from Grain."""

  name = "streaming"
  gathers = False  # the train function takes uint8 batches
  arg_kinds = (parallel.batch_axis(1),)

  def __init__(self, runner, batches: StreamingBatches):
    self.runner, self.batches = runner, batches

  def args(self, n):
    return (self.runner.put(self.batches.take(n), parallel.batch_axis(1)),)

  @property
  def epoch(self):
    return self.batches.epoch + self.batches.position / self.batches.num_examples

  def state(self):
    return self.batches.state()


def create_feed(
  train_data, runner, *, seed, batch_size, read_threads=2, prefetch_batches=64, data_state=None
):
  """The feed for `train_data`: loaded images (in_memory) or an opened `records.Split` (streaming).

  `data_state` (a checkpoint's `data` item, from either path) resumes at the exact next batch.
  """
  if isinstance(train_data, np.ndarray):
    if data_state is not None:
      _check_resumable(data_state, len(train_data))
      stream = order.IndexStream.from_state(data_state)
    else:
      stream = order.IndexStream(len(train_data), seed)
    return InMemoryFeed(runner, train_data, batch_size, stream)
  options = dict(read_threads=read_threads, prefetch_batches=prefetch_batches)
  if data_state is not None:
    batches = StreamingBatches.from_state(data_state, train_data, batch_size, **options)
  else:
    batches = StreamingBatches(train_data, seed, batch_size, **options)
  return StreamingFeed(runner, batches)
