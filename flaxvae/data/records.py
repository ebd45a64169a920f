"""Reading and writing prepared datasets: TFDS ArrayRecord files, without TensorFlow.

Every dataset is a TFDS ArrayRecord dataset with uint8 HWC images under the feature `image`,
stored either encoded (PNG/JPEG, `tfds.features.Image`, as the TFDS catalog writes them) or as
raw bytes (`tfds.features.Tensor` with BYTES encoding, as flaxvae writes them: no decoding).

"Example i" of a split is a fixed record: the record whose `index` feature is i when the dataset
has one (flaxvae's own datasets, in source order), else the i-th record of the split's files.
Both input pipelines read through `Split`, so they agree on what example i is.
"""

import contextlib
import io
import os
import shutil
import sys
import tempfile
import threading

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
from tensorflow_datasets.proto import tf_example_pb2

from flaxvae import console
from flaxvae.errors import DataError, one_line

FOLDER_VERSION = "1.0.0"


def latest_version_dir(folder):
  """The highest version folder under `folder` holding a complete dataset, or None."""
  if not os.path.isdir(folder):
    return None
  versions = [
    v for v in os.listdir(folder) if os.path.isfile(os.path.join(folder, v, "dataset_info.json"))
  ]
  if not versions:
    return None
  return os.path.join(
    folder, max(versions, key=lambda v: tuple(int(p) for p in v.split(".") if p.isdigit()))
  )


class Split:
  """One split of a prepared dataset: its size, image shape, and `read(example_ids)`."""

  def __init__(self, builder_dir, split, scale=1):
    self.builder_dir = builder_dir
    if not os.path.isfile(os.path.join(builder_dir, "dataset_info.json")):  # else TFDS raises
      raise DataError(
        f"dataset not prepared in {builder_dir} (no dataset_info.json): run its "
        "`flaxvae prepare-data` command, or point data.data_dir at where it was "
        "prepared"
      )
    builder = tfds.builder_from_directory(builder_dir)
    if split not in builder.info.splits:
      raise DataError(
        f"unknown split {split!r}: {builder_dir} has {', '.join(sorted(builder.info.splits))}"
      )
    self.split = split
    feature = builder.info.features["image"] if "image" in builder.info.features else None
    if feature is None:
      raise DataError(f"{builder_dir} has no `image` feature: it is not an image dataset")
    shape = tuple(feature.shape)
    if None in shape or feature.np_dtype != np.uint8 or len(shape) != 3:
      raise DataError(
        f"{builder_dir}: `image` must be uint8 [H, W, C] of fixed size, got "
        f"{feature.np_dtype} {list(shape)}"
      )
    self.image_shape = shape
    self.encoded = isinstance(feature, tfds.features.Image)
    self.scale = scale  # stored values times this are 0..255 (binarized_mnist stores 0/1)
    self.has_index = "index" in builder.info.features
    self.files = [(fi.filename, fi.take) for fi in builder.info.splits[split].file_instructions]
    try:
      self.source = builder.as_data_source(
        split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
      )
      self.num_examples = len(self.source)
    except (RuntimeError, OSError, ValueError) as e:
      raise DataError(
        f"cannot open split {split!r} of {builder_dir} ({one_line(e, 200)}): "
        f"delete the folder and run the prepare-data command again"
      ) from None
    self._check_files()
    self._order = None
    self._lock = threading.Lock()

  @property
  def nbytes(self):
    return self.num_examples * int(np.prod(self.image_shape))

  def _check_files(self):
    """Reads the first and last record of every file: a truncated file reads as empty records."""
    start = 0
    for _, count in self.files:
      for i in sorted({start, start + count - 1}) if count else ():
        self._parse(self._get([i])[0], i)
      start += count

  def file_of(self, record):
    """The file holding record number `record` of this split."""
    for filename, count in self.files:
      if record < count:
        return filename
      record -= count
    return self.files[-1][0]

  def _get(self, records):
    try:
      return self.source.__getitems__(records)
    except (RuntimeError, OSError) as e:
      bad = records[0]
      for r in records:  # find the first record that fails, to name its file
        try:
          self.source.__getitems__([r])
        except (RuntimeError, OSError):
          bad = r
          break
      raise DataError(
        f"record file {self.file_of(bad)} is corrupt ({one_line(e, 200)}): delete "
        f"{self.builder_dir} and prepare the dataset again"
      ) from None

  def _parse(self, record, i):
    feature = tf_example_pb2.Example.FromString(record).features.feature if record else {}
    if "image" not in feature or not feature["image"].bytes_list.value:
      raise DataError(
        f"record file {self.file_of(i)} is corrupt or truncated (record {i} is "
        f"empty): delete {self.builder_dir} and prepare the dataset again"
      )
    return feature

  @property
  def order(self):
    """record number of each example id, or None when example i is record i."""
    if not self.has_index:
      return None
    with self._lock:
      if self._order is None:
        self._order = load_or_build_order(self)
    return self._order

  def records_of(self, example_ids):
    order = self.order
    ids = np.asarray(example_ids, np.int64)
    return (ids if order is None else order[ids]).tolist()

  def read(self, example_ids):
    """uint8 images [len(ids), H, W, C] of the given example ids."""
    records = self.records_of(example_ids)
    raw = self._get(records)
    out = np.empty((len(records), *self.image_shape), np.uint8)
    if self.encoded:
      for k, (rec, r) in enumerate(zip(raw, records)):
        out[k] = _decode_image(
          self._parse(rec, r)["image"].bytes_list.value[0], self.image_shape, self.file_of(r)
        )
    else:
      size = int(np.prod(self.image_shape))
      parts = [self._parse(rec, r)["image"].bytes_list.value[0] for rec, r in zip(raw, records)]
      for part, r in zip(parts, records):
        if len(part) != size:
          raise DataError(
            f"record file {self.file_of(r)} is corrupt (record {r} has "
            f"{len(part)} image bytes, want {size}): prepare the dataset again"
          )
      out[:] = np.frombuffer(b"".join(parts), np.uint8).reshape(out.shape)
    if self.scale != 1:
      out *= np.uint8(self.scale)
    return out

  def read_all(self, chunk=4096):
    return np.concatenate(
      [
        self.read(np.arange(s, min(s + chunk, self.num_examples)))
        for s in range(0, self.num_examples, chunk)
      ]
    )


def _decode_image(data, shape, filename):
  try:
    with PIL.Image.open(io.BytesIO(data)) as image:
      array = np.asarray(image)
  except Exception as e:  # PIL raises many types for a bad stream
    raise DataError(
      f"record file {filename} holds an undecodable image ({one_line(e, 200)}): "
      "prepare the dataset again"
    ) from None
  if array.ndim == 2:
    array = array[..., None]
  if array.shape != shape:
    raise DataError(
      f"record file {filename} holds a {list(array.shape)} image, the dataset says "
      f"{list(shape)}: prepare the dataset again"
    )
  return array


def _order_path(builder_dir, split):
  return os.path.join(builder_dir, f"flaxvae-order-{split}.npy")


def load_or_build_order(split: Split):
  """record number of each `index`, cached beside the dataset (written once, atomically)."""
  path = _order_path(split.builder_dir, split.split)
  if os.path.isfile(path):
    order = np.load(path)
    if len(order) == split.num_examples:
      return order
  index = np.empty(split.num_examples, np.int64)
  chunk = 8192
  for s in range(0, split.num_examples, chunk):
    records = list(range(s, min(s + chunk, split.num_examples)))
    for r, rec in zip(records, split._get(records)):
      index[r] = split._parse(rec, r)["index"].int64_list.value[0]
  order = np.argsort(index)
  if not np.array_equal(index[order], np.arange(split.num_examples)):
    raise DataError(
      f"{split.builder_dir} is damaged (split {split.split!r} misses examples): "
      "delete it and prepare the dataset again"
    )
  with contextlib.suppress(OSError):  # a read-only data_dir just means no cache
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
      np.save(f, order)
    os.replace(tmp, path)
  return order


# ----------------------------------------------------------------------------
# Writing: flaxvae's own datasets (folders, derived crops) and test fixtures, TF-free.
# ----------------------------------------------------------------------------
# TFDS takes skip_registration in its builders' __init_subclass__, which its stubs do not declare.
class _ImageDataset(tfds.core.GeneratorBasedBuilder, skip_registration=True):  # type: ignore[call-arg]
  """Writes {split: callable yielding (image uint8 HWC, label)} as a TFDS dataset."""

  VERSION = tfds.core.Version(FOLDER_VERSION)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return None  # no metadata files beside the code; TFDS's lookup fails for package builders

  def __init__(self, name, version, image_shape, splits, encoding, **kwargs):
    self.name = name
    self.VERSION = tfds.core.Version(version)
    self._image_shape, self._splits, self._encoding = image_shape, splits, encoding
    super().__init__(**kwargs)

  def _info(self):
    if self._encoding == "raw":
      image = tfds.features.Tensor(
        shape=self._image_shape, dtype=np.uint8, encoding=tfds.features.Encoding.BYTES
      )
    else:  # the TFDS catalog's schema: PNG-encoded images, no `index`
      image = tfds.features.Image(shape=self._image_shape, encoding_format=self._encoding)
    features = {"image": image, "label": tfds.features.Tensor(shape=(), dtype=np.int64)}
    if self._encoding == "raw":
      features["index"] = tfds.features.Tensor(shape=(), dtype=np.int64)
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(features),
      description="images written by flaxvae",
    )

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split) for split in self._splits}

  def _generate_examples(self, split):
    for i, (image, label) in enumerate(self._splits[split]()):
      if self._encoding == "raw":
        yield i, {"image": image, "label": int(label), "index": i}
      else:
        yield (
          i,
          {
            "image": PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image),
            "label": int(label),
          },
        )


def _counted(generate, progress):
  def generate_counted():
    done = 0
    for item in generate():
      yield item
      done += 1
      progress.update(done)
    progress.total = done
    progress.update(done)

  return generate_counted


def write_dataset(
  data_dir, name, image_shape, splits, *, version=FOLDER_VERSION, encoding="raw", sizes=None
):
  """Writes `splits` ({split: zero-arg callable yielding (image, label)}); returns builder dir.

  encoding "raw" is flaxvae's fast schema (with `index`); "png" mimics the TFDS catalog.
  `sizes` ({split: examples}) turns on a progress line per split.
  """
  builder_dir = os.path.join(data_dir, name, version)
  if os.path.isdir(builder_dir):  # no dataset_info.json (callers check): an interrupted build
    shutil.rmtree(builder_dir)
  if sizes:
    stdout = sys.stdout  # TFDS's own chatter is silenced below; progress goes to the console
    splits = {
      split: _counted(
        generate,
        console.Progress(
          sizes.get(split, 0), f"preparing {name}/{split}", "examples", stream=stdout
        ),
      )
      for split, generate in splits.items()
    }
  builder = _ImageDataset(
    name,
    version,
    tuple(image_shape),
    splits,
    encoding,
    data_dir=data_dir,
    file_format="array_record",
  )
  tfds.disable_progress_bar()
  with tempfile.TemporaryDirectory() as download_dir, contextlib.redirect_stdout(io.StringIO()):
    builder.download_and_prepare(
      download_dir=download_dir,
      download_config=tfds.download.DownloadConfig(try_download_gcs=False),
    )
  if encoding == "raw":
    for split in splits:  # cache the order now, so training never scans
      load_or_build_order(Split(builder_dir, split))
  return builder_dir
