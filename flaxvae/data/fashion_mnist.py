"""Fashion-MNIST as a TFDS ArrayRecord dataset, built from the original IDX files without
TensorFlow.

TFDS's catalog `fashion_mnist` needs TensorFlow and internet to prepare; this module writes the
same data from Debian's dataset-fashion-mnist IDX files under its own name, `fashion_mnist_idx`,
so the two never clash, in flaxvae's raw schema (records.write_dataset). TFDS writes the split
files into an `incomplete.*` folder and renames it when done, so a dataset folder with a
`dataset_info.json` is complete; anything else is redone. Every example stores its position in
the IDX file (`index`), so example i is the IDX file's image i whatever TFDS's write order.
"""

import gzip
import logging
import os
import zlib
from typing import Any

import numpy as np

from flaxvae.data import catalog, records, registry
from flaxvae.errors import DataError

DEFAULT_SOURCE_DIR = "/usr/share/datasets/fashion-mnist"
NAME = "fashion_mnist_idx"
VERSION = "1.0.0"
SPLITS = {"train": "train", "test": "t10k"}  # TFDS split name -> IDX file prefix
IMAGE_SHAPE = (28, 28, 1)
SPLIT_SIZES = {"train": 60_000, "test": 10_000}

log = logging.getLogger("flaxvae")

# IDX type codes (third magic byte) -> big-endian numpy dtypes.
_IDX_DTYPES: dict[int, Any] = {
  0x08: np.uint8,
  0x09: np.int8,
  0x0B: ">i2",
  0x0C: ">i4",
  0x0D: ">f4",
  0x0E: ">f8",
}


def read_idx(path) -> np.ndarray:
  """The array stored in an IDX file (gzipped if the name ends in .gz), with the file's shape.

  Checks the header and that the payload is exactly as long as the header says, so a wrong or
  truncated download fails here, naming the file, rather than as odd images later.
  """
  path = os.fspath(path)
  try:
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f"cannot read IDX file {path} ({e}): replace it with a good copy") from None
  if len(data) < 4:
    raise DataError(
      f"IDX file {path} is truncated ({len(data)} bytes): replace it with a good copy"
    )
  if data[:2] != b"\0\0" or data[2] not in _IDX_DTYPES or data[3] == 0:
    raise DataError(
      f"{path} is not an IDX file (bad magic number {data[:4].hex()}): replace it with a good copy"
    )
  dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
  header = 4 + 4 * ndim
  if len(data) < header:
    raise DataError(f"IDX file {path} is truncated (header cut short): replace it with a good copy")
  shape = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, 4))
  expected = header + int(np.prod(shape)) * dtype.itemsize
  if len(data) != expected:
    raise DataError(
      f"IDX file {path} has {len(data)} bytes but its header {list(shape)} needs "
      f"{expected}: replace it with a good copy"
    )
  return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx_file(source_dir, stem):
  for name in (stem + ".gz", stem):
    if os.path.isfile(os.path.join(source_dir, name)):
      return os.path.join(source_dir, name)
  return None


def _read_source(source_dir):
  """{split: (images [N,28,28,1] uint8, labels [N])} from the four IDX files, all checked."""
  stems = [
    f"{prefix}-{kind}"
    for prefix in SPLITS.values()
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")
  ]
  paths = {stem: _find_idx_file(source_dir, stem) for stem in stems}
  missing = [stem + "[.gz]" for stem, path in paths.items() if path is None]
  if missing:
    what = "has no Fashion-MNIST IDX files" if len(missing) == 4 else "lacks " + ", ".join(missing)
    raise DataError(
      f"data.source_dir {source_dir} {what}: install Debian's dataset-fashion-mnist "
      f"(`make install`) or set --config.data.source_dir to a folder with {', '.join(stems)} "
      "(each optionally .gz)"
    )
  arrays = {}
  for split, prefix in SPLITS.items():
    images_path = paths[f"{prefix}-images-idx3-ubyte"]
    labels_path = paths[f"{prefix}-labels-idx1-ubyte"]
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.shape[1:] != (28, 28):
      raise DataError(
        f"{images_path} is not a Fashion-MNIST image file (want uint8 [N, 28, 28], "
        f"got {images.dtype} {list(images.shape)}): replace it with a good copy"
      )
    if labels.dtype != np.uint8 or labels.ndim != 1:
      raise DataError(
        f"{labels_path} is not a Fashion-MNIST label file (want uint8 [N], "
        f"got {labels.dtype} {list(labels.shape)}): replace it with a good copy"
      )
    if len(images) != len(labels):
      raise DataError(
        f"{images_path} has {len(images)} images but {labels_path} has "
        f"{len(labels)} labels: replace them with matching copies"
      )
    arrays[split] = (images[..., None], labels.astype(np.int64))
  return arrays


def _is_prepared(builder_dir):
  return os.path.isfile(os.path.join(builder_dir, "dataset_info.json"))


def prepare_fashion_mnist(source_dir: str | None, data_dir: str | None) -> str:
  """Idempotent: builds the ArrayRecord dataset if not yet there; returns the builder directory.

  The builder directory is `data_dir/fashion_mnist_idx/1.0.0`. When already prepared it only
  checks for the dataset_info.json TFDS writes last, so the source files may be gone by then.
  `None` means DEFAULT_SOURCE_DIR / catalog.default_data_dir().
  """
  source_dir = os.path.expanduser(source_dir or DEFAULT_SOURCE_DIR)
  data_dir = os.path.expanduser(data_dir or catalog.default_data_dir())
  builder_dir = os.path.join(data_dir, NAME, VERSION)
  if _is_prepared(builder_dir):
    return builder_dir
  arrays = _read_source(source_dir)  # before TFDS runs, so bad files surface as a DataError
  log.info("Preparing Fashion-MNIST from %s into %s (once)", source_dir, builder_dir)

  def examples(split):
    images, labels = arrays[split]
    return lambda: zip(images, labels)

  try:
    return records.write_dataset(
      data_dir,
      NAME,
      IMAGE_SHAPE,
      {split: examples(split) for split in arrays},
      version=VERSION,
      sizes={split: len(arrays[split][1]) for split in arrays},
    )
  except OSError:
    if not _is_prepared(builder_dir):  # else another process won the final rename: fine
      raise
  return builder_dir


class _Entry:
  """Fashion-MNIST in registry.DATASETS: prepared on first use, so finding it is preparing it."""

  image_shape, split_sizes, scale = IMAGE_SHAPE, SPLIT_SIZES, 1

  def builder_dir(self, data_dir, source_dir=None):
    return prepare_fashion_mnist(source_dir, data_dir)

  prepare = builder_dir


registry.DATASETS.register("fashion_mnist")(_Entry())
