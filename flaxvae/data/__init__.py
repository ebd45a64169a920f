"""Data: where datasets come from, how they are read, and how they reach the devices.

  registry.py       DATASETS: each name's shape, split sizes, prepared folder and preparation
  catalog.py        where prepared datasets live, the TFDS catalog, preparing it
  records.py        reading and writing ArrayRecord datasets without TensorFlow
  fashion_mnist.py  Debian's IDX files -> a prepared dataset (the offline default)
  folder.py         a folder of the user's images -> a prepared dataset
  protocols.py      binarized / static_binarized / 8bit / grey: what the model is scored on
  order.py          the example order, a pure function of (seed, epoch)
  feeds.py          the in-memory and streaming paths to the devices

A `Dataset` is what a run reads: `PreparedDataset(settings.data)` on disk, or `ArrayDataset` for
arrays already in memory (notebooks, tests). A new dataset is one file that prepares it in
flaxvae's raw schema (records.write_dataset) and registers its entry in registry.DATASETS (see
registry.py), imported below; `prepare-data NAME` and `data.name=NAME` then know it. Any other
name is a folder of the user's images (`prepare-data folder --name NAME`).
"""

import numpy as np

from flaxvae.data import catalog, fashion_mnist, records, registry  # noqa: F401  (they register)
from flaxvae.errors import ConfigError, DataError

PIPELINES = ("auto", "in_memory", "streaming")


class PreparedDataset:
  """A prepared dataset on disk, named by `data.name` (Fashion-MNIST is prepared on first use)."""

  def __init__(self, settings):
    """`settings`: settings.DataSettings."""
    self.settings, self.name = settings, settings.name
    self.entry = registry.entry_of(self.name)
    self._builder_dir = None

  @property
  def builder_dir(self):
    if self._builder_dir is None:
      self._builder_dir = self.entry.builder_dir(
        catalog.data_dir_of(self.settings), self.settings.source_dir or None
      )
    return self._builder_dir

  def open_split(self, split):
    return records.Split(self.builder_dir, split, self.entry.scale)

  def images(self, split):
    """uint8 images [N, H, W, C] of `split`, in example order."""
    return self.open_split(split).read_all()

  @property
  def image_shape(self):
    """(H, W, C): known without reading for registered datasets (and FOLDER_SHAPES)."""
    if self.entry.image_shape:
      return tuple(self.entry.image_shape)
    return tuple(self.open_split(self.settings.train_split).image_shape)

  def split_bytes(self, split):
    """Bytes of the split's images; known without reading for registered datasets."""
    if self.entry.split_sizes is None:
      return self.open_split(split).nbytes
    return self.entry.split_sizes.get(split, 0) * int(np.prod(self.entry.image_shape))


class ArrayDataset:
  """Splits already in memory ({split: uint8 [N, H, W, C]}): notebooks, tests, synthetic data."""

  def __init__(self, splits, name="arrays"):
    self.splits, self.name = {k: np.asarray(v, np.uint8) for k, v in splits.items()}, name

  @property
  def image_shape(self):
    return next(iter(self.splits.values())).shape[1:]

  def images(self, split):
    if split not in self.splits:
      raise DataError(f"unknown split {split!r}: this dataset has {', '.join(sorted(self.splits))}")
    return self.splits[split]

  def split_bytes(self, split):
    return self.images(split).nbytes

  def open_split(self, split):
    raise DataError("arrays in memory have no streaming split: set data.pipeline=in_memory")


def open_dataset(settings):
  """The prepared dataset settings.DataSettings names."""
  return PreparedDataset(settings)


def choose_pipeline(settings, dataset, split):
  """ "in_memory" or "streaming" for `split`: data.pipeline, or by size when it is "auto"
  (`settings`: settings.DataSettings)."""
  choice = settings.pipeline
  if choice not in PIPELINES:
    raise ConfigError(f"unknown data.pipeline {choice!r}: use {', '.join(PIPELINES)}")
  if choice != "auto":
    return choice
  if isinstance(dataset, ArrayDataset):
    return "in_memory"
  return "in_memory" if dataset.split_bytes(split) <= settings.in_memory_max_bytes else "streaming"
