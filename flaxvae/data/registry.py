"""The dataset registry (`data.name`), kept apart so dataset files can register themselves
without importing the package that imports them.

An entry tells a run what it needs without reading the data, and where the data is:
  image_shape   (H, W, C); None: read from the prepared train split
  split_sizes   {split: examples}; None: a split's bytes are read from disk
  scale         the prepared values times this are 0..255 (binarized_mnist stores 0/1)
  builder_dir(data_dir, source_dir)  its prepared folder, or a DataError naming the command
  prepare(data_dir, source_dir)      prepares it once (`flaxvae prepare-data NAME`): its folder
Fashion-MNIST registers in fashion_mnist.py, the TFDS catalog in catalog.py. A name nobody
registered is the user's folder dataset (`flaxvae prepare-data folder --name NAME`).
"""

import os

from flaxvae.data import records
from flaxvae.errors import DataError
from flaxvae.registry import Registry

DATASETS = Registry("data.name")
# Datasets the user prepares from their own files (`prepare-data folder --name NAME`) whose
# shape the shipped configs rely on, so they compile ahead of time without the data.
FOLDER_SHAPES = {"ffhq256": (256, 256, 3)}


class FolderDataset:
  """The user's images under data_dir/NAME: sizes (and most shapes) are read from disk."""

  split_sizes, scale = None, 1

  def __init__(self, name):
    self.name, self.image_shape = name, FOLDER_SHAPES.get(name)

  def builder_dir(self, data_dir, source_dir=None):
    del source_dir  # prepared from the user's folder by `prepare-data folder`, never here
    found = records.latest_version_dir(os.path.join(data_dir, self.name))
    if found is None:
      raise DataError(
        f"dataset {self.name!r} is not prepared in {data_dir}: run "
        f"`flaxvae prepare-data folder --source DIR --name {self.name}` "
        f"(catalog: {', '.join(DATASETS.names())})"
      )
    return found


def entry_of(name):
  """The registered dataset `name`, else the user's folder dataset of that name."""
  return DATASETS.get(name) if name in DATASETS else FolderDataset(name)
