"""Fashion-MNIST as a TFDS ArrayRecord dataset, built from the original IDX files without TensorFlow.

TFDS's catalog `fashion_mnist` needs TensorFlow and internet to prepare; this module builds the
same data from Debian's dataset-fashion-mnist IDX files under its own name, `fashion_mnist_idx`,
so the two never clash. TFDS writes the split files into an `incomplete.*` folder and renames it
when done, so a dataset folder with a `dataset_info.json` is complete; anything else is redone.

TFDS shuffles examples by key hash when it writes them, so every example also stores its position
in the IDX file (`index`) and `load_split` puts them back in that order: the in-memory order is
the IDX order whatever the data_dir, the TFDS version or the machine.
"""
import contextlib
import gzip
import io
import logging
import os
import shutil
import tempfile
import zlib

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.proto import tf_example_pb2

DEFAULT_SOURCE_DIR = "/usr/share/datasets/fashion-mnist"
NAME = "fashion_mnist_idx"
VERSION = "1.0.0"
SPLITS = {"train": "train", "test": "t10k"}  # TFDS split name -> IDX file prefix

log = logging.getLogger("flaxvae")

# IDX type codes (third magic byte) -> big-endian numpy dtypes.
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(ValueError):
  """A dataset problem the user can fix; str() is one line saying what to do."""


def default_data_dir() -> str:
  """Where prepared datasets live: $FLAXVAE_DATA_DIR, else ~/.cache/flaxvae/tfds."""
  return os.path.expanduser(os.environ.get("FLAXVAE_DATA_DIR") or "~/.cache/flaxvae/tfds")


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
    raise DataError(f"IDX file {path} is truncated ({len(data)} bytes): replace it with a good copy")
  if data[:2] != b"\0\0" or data[2] not in _IDX_DTYPES or data[3] == 0:
    raise DataError(f"{path} is not an IDX file (bad magic number {data[:4].hex()}): "
                    "replace it with a good copy")
  dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
  header = 4 + 4 * ndim
  if len(data) < header:
    raise DataError(f"IDX file {path} is truncated (header cut short): replace it with a good copy")
  shape = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, 4))
  expected = header + int(np.prod(shape)) * dtype.itemsize
  if len(data) != expected:
    raise DataError(f"IDX file {path} has {len(data)} bytes but its header {list(shape)} needs "
                    f"{expected}: replace it with a good copy")
  return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx_file(source_dir, stem):
  for name in (stem + ".gz", stem):
    if os.path.isfile(os.path.join(source_dir, name)):
      return os.path.join(source_dir, name)
  return None


def _read_source(source_dir):
  """{split: (images [N,28,28,1] uint8, labels [N])} from the four IDX files, all checked."""
  stems = [f"{prefix}-{kind}" for prefix in SPLITS.values()
           for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
  paths = {stem: _find_idx_file(source_dir, stem) for stem in stems}
  missing = [stem + "[.gz]" for stem, path in paths.items() if path is None]
  if missing:
    what = "has no Fashion-MNIST IDX files" if len(missing) == 4 else "lacks " + ", ".join(missing)
    raise DataError(
        f"data.source_dir {source_dir} {what}: install Debian's dataset-fashion-mnist "
        f"(`make install`) or set --config.data.source_dir to a folder with {', '.join(stems)} "
        "(each optionally .gz)")
  arrays = {}
  for split, prefix in SPLITS.items():
    images_path = paths[f"{prefix}-images-idx3-ubyte"]
    labels_path = paths[f"{prefix}-labels-idx1-ubyte"]
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.shape[1:] != (28, 28):
      raise DataError(f"{images_path} is not a Fashion-MNIST image file (want uint8 [N, 28, 28], "
                      f"got {images.dtype} {list(images.shape)}): replace it with a good copy")
    if labels.dtype != np.uint8 or labels.ndim != 1:
      raise DataError(f"{labels_path} is not a Fashion-MNIST label file (want uint8 [N], "
                      f"got {labels.dtype} {list(labels.shape)}): replace it with a good copy")
    if len(images) != len(labels):
      raise DataError(f"{images_path} has {len(images)} images but {labels_path} has "
                      f"{len(labels)} labels: replace them with matching copies")
    arrays[split] = (images[..., None], labels.astype(np.int64))
  return arrays


class _FashionMnistIdx(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes in-memory IDX arrays as TFDS splits; not registered, so it never shadows the catalog."""
  name = NAME
  VERSION = tfds.core.Version(VERSION)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    """No files beside the code (checksums, metadata). TFDS's own lookup also crashes for a
    builder defined in a package unless the backport `importlib_resources` is installed."""
    return None

  def __init__(self, arrays, **kwargs):
    self._arrays = arrays
    super().__init__(**kwargs)

  def _info(self):
    # `self.dataset_info_from_configs` would look for metadata files next to this module.
    return tfds.core.DatasetInfo(
        builder=self,
        description="Fashion-MNIST from the original IDX files; `index` is the position there.",
        features=tfds.features.FeaturesDict({
            # BYTES: one 784-byte string per image instead of 784 varints; ~10x faster to read.
            "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8,
                                          encoding=tfds.features.Encoding.BYTES),
            "label": tfds.features.Tensor(shape=(), dtype=np.int64),
            "index": tfds.features.Tensor(shape=(), dtype=np.int64),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split) for split in self._arrays}

  def _generate_examples(self, split):
    images, labels = self._arrays[split]
    for i in range(len(labels)):
      yield i, {"image": images[i], "label": labels[i], "index": i}


def _is_prepared(builder_dir):
  return os.path.isfile(os.path.join(builder_dir, "dataset_info.json"))


def prepare_fashion_mnist(source_dir: str | None, data_dir: str | None) -> str:
  """Idempotent: builds the ArrayRecord dataset if not yet there; returns the builder directory.

  The builder directory is `data_dir/fashion_mnist_idx/1.0.0`. Fast (<1 s) when already prepared:
  it only checks for the dataset_info.json TFDS writes last, so the source files may be gone by then.
  `None` means DEFAULT_SOURCE_DIR / default_data_dir(). Takes ~5 s the first time.
  """
  source_dir = os.path.expanduser(source_dir or DEFAULT_SOURCE_DIR)
  data_dir = os.path.expanduser(data_dir or default_data_dir())
  builder_dir = os.path.join(data_dir, NAME, VERSION)
  if _is_prepared(builder_dir):
    return builder_dir
  arrays = _read_source(source_dir)  # before TFDS runs, so bad files surface as a DataError
  if os.path.isdir(builder_dir):  # no dataset_info.json: not ours to trust; TFDS cannot rename onto it
    shutil.rmtree(builder_dir)
  log.info("Preparing Fashion-MNIST from %s into %s (once)", source_dir, builder_dir)
  builder = _FashionMnistIdx(arrays, data_dir=data_dir, file_format="array_record")
  tfds.disable_progress_bar()  # process-wide; flaxvae never wants TFDS's bars
  try:
    # try_download_gcs=False: otherwise TFDS asks gs://tfds-data about the name (network).
    # The download folder stays empty; a temporary one keeps data_dir free of it.
    with tempfile.TemporaryDirectory() as download_dir, contextlib.redirect_stdout(io.StringIO()):
      builder.download_and_prepare(
          download_dir=download_dir,
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  except OSError:
    if not _is_prepared(builder_dir):  # else another process won the final rename: fine
      raise
  return builder_dir


def load_split(builder_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N,28,28,1], labels int64 [N]) of a prepared split, in the original IDX order.

  DataError if the dataset is not prepared in `builder_dir` or has no such split.

  Reads every record in one batch and parses the protos directly: TFDS's per-example decoding
  alone takes ~2.5 s for the 60,000 training examples; this whole function takes ~1 s.
  """
  builder_dir = os.fspath(builder_dir)
  if not _is_prepared(builder_dir):
    raise DataError(f"Fashion-MNIST is not prepared in {builder_dir}: run "
                    "`flaxvae prepare-data fashion_mnist` or `make install`")
  builder = tfds.builder_from_directory(builder_dir)
  if builder.info.name != NAME:
    raise DataError(f"{builder_dir} holds dataset {builder.info.name!r}, not {NAME!r}: "
                    "point data.data_dir at the folder `flaxvae prepare-data fashion_mnist` wrote")
  if split not in builder.info.splits:
    raise DataError(f"unknown split {split!r}: {builder_dir} has "
                    f"{', '.join(sorted(builder.info.splits))}")
  source = builder.as_data_source(split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  n = len(source)
  images, labels, index = [], np.empty(n, np.int64), np.empty(n, np.int64)
  for i, record in enumerate(source.__getitems__(range(n))):
    feature = tf_example_pb2.Example.FromString(record).features.feature
    images.append(feature["image"].bytes_list.value[0])
    labels[i] = feature["label"].int64_list.value[0]
    index[i] = feature["index"].int64_list.value[0]
  images = np.frombuffer(b"".join(images), np.uint8).reshape(n, 28, 28, 1)
  order = np.argsort(index)
  if not np.array_equal(index[order], np.arange(n)):
    raise DataError(f"{builder_dir} is damaged (split {split!r} misses examples): delete it and "
                    "run `flaxvae prepare-data fashion_mnist`")
  return images[order], labels[order]
