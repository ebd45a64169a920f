"""Where prepared datasets live, and the TFDS catalog's datasets (in registry.DATASETS).

Prepared datasets live in the first of: `data.data_dir`, $FLAXVAE_DATA_DIR, $TFDS_DATA_DIR
(so TFDS users' prepared data is found where they keep it), ~/.cache/flaxvae/tfds.
Catalog datasets (CIFAR-10, ImageNet, ...) are downloaded and prepared once by TFDS, which
needs TensorFlow and internet; training then needs neither.
"""

import dataclasses
import logging
import os

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from flaxvae.data import records, registry
from flaxvae.errors import DataError

log = logging.getLogger("flaxvae")

CACHE_DIR = "~/.cache/flaxvae/tfds"
DATA_DIR_VARIABLES = ("FLAXVAE_DATA_DIR", "TFDS_DATA_DIR")  # in this order, after data.data_dir
DERIVED_SUFFIX = "_crops"  # celeb_a -> celeb_a_crops: the 64x64 crops flaxvae derives once


@dataclasses.dataclass(frozen=True)
class CatalogEntry:
  """A TFDS catalog dataset, as registered in registry.DATASETS under `name`."""

  name: str  # its data.name
  tfds_name: str  # the TFDS catalog builder (and its folder under data_dir)
  image_shape: tuple
  split_sizes: dict
  scale: int = 1  # multiply stored values by this to get 0..255 (binarized_mnist stores 0/1)
  crop: int = 0  # > 0: a derived dataset of centre crops of this size, resized to image_shape

  @property
  def folder(self):
    """Its prepared folder's name under data_dir: TFDS's, or the crops flaxvae derives."""
    return self.tfds_name + (DERIVED_SUFFIX if self.crop else "")

  def builder_dir(self, data_dir, source_dir=None):
    """Its prepared folder; DataError naming the command if none."""
    del source_dir  # TFDS downloads it
    found = records.latest_version_dir(os.path.join(data_dir, self.folder))
    if found is None:
      raise DataError(
        f"dataset {self.name} is not prepared in {data_dir}: run `flaxvae "
        f"prepare-data {self.name}` once (needs `pip install 'flaxvae[prep]'` and "
        "internet), or set data.data_dir / $FLAXVAE_DATA_DIR / $TFDS_DATA_DIR to "
        "where it was prepared"
      )
    return found

  def prepare(self, data_dir=None, source_dir=None):
    """Downloads and prepares it as ArrayRecord (needs TF); returns its folder."""
    del source_dir  # TFDS downloads it
    data_dir = os.path.expanduser(data_dir or default_data_dir())
    done = records.latest_version_dir(os.path.join(data_dir, self.folder))
    if done:
      return done
    if records.latest_version_dir(os.path.join(data_dir, self.tfds_name)) is None:
      try:
        import tensorflow  # noqa: F401, PLC0415  (optional: TFDS needs it to download and encode)
      except ImportError:
        raise DataError(
          f"preparing {self.name} needs TensorFlow and internet once: "
          f"`pip install 'flaxvae[prep]'`, then `flaxvae prepare-data {self.name}` "
          "(training then needs neither)"
        ) from None
      builder = tfds.builder(self.tfds_name, data_dir=data_dir, file_format="array_record")
      builder.download_and_prepare()
    if self.crop:
      return self._derive_crops(data_dir)
    return records.latest_version_dir(os.path.join(data_dir, self.tfds_name))

  def _derive_crops(self, data_dir):
    """The TFDS dataset's images as centre crops resized to image_shape, raw bytes."""
    source_dir = records.latest_version_dir(os.path.join(data_dir, self.tfds_name))
    if source_dir is None:
      raise DataError(
        f"{self.tfds_name} is not prepared in {data_dir}: run `flaxvae prepare-data {self.name}`"
      )
    builder = tfds.builder_from_directory(source_dir)
    height, width = self.image_shape[:2]

    def crops(split):
      def generate():
        source = records.Split(source_dir, split)
        for s in range(0, source.num_examples, 1024):
          for image in source.read(np.arange(s, min(s + 1024, source.num_examples))):
            yield center_crop(image, self.crop, (height, width)), 0

      return generate

    log.info("Deriving %dx%d centre crops of %s (once)", height, width, self.name)
    return records.write_dataset(
      data_dir,
      self.folder,
      self.image_shape,
      {split: crops(split) for split in builder.info.splits},
      sizes={s: i.num_examples for s, i in builder.info.splits.items()},
    )


_IMAGENET_SIZES = {"train": 1_281_167, "validation": 50_000}
_IMAGENET32 = CatalogEntry("imagenet32", "downsampled_imagenet/32x32", (32, 32, 3), _IMAGENET_SIZES)
for _entry in (
  CatalogEntry("mnist", "mnist", (28, 28, 1), {"train": 60_000, "test": 10_000}),
  CatalogEntry(
    "binarized_mnist",
    "binarized_mnist",
    (28, 28, 1),
    {"train": 50_000, "validation": 10_000, "test": 10_000},
    scale=255,
  ),
  CatalogEntry("cifar10", "cifar10", (32, 32, 3), {"train": 50_000, "test": 10_000}),
  CatalogEntry(
    "celeb_a",
    "celeb_a",
    (64, 64, 3),
    {"train": 162_770, "validation": 19_867, "test": 19_962},
    crop=140,
  ),
  _IMAGENET32,
  dataclasses.replace(_IMAGENET32, name="downsampled_imagenet"),
  CatalogEntry("imagenet64", "downsampled_imagenet/64x64", (64, 64, 3), _IMAGENET_SIZES),
):
  registry.DATASETS.register(_entry.name)(_entry)


def default_data_dir(environ=None) -> str:
  """$FLAXVAE_DATA_DIR, else $TFDS_DATA_DIR, else ~/.cache/flaxvae/tfds."""
  environ = os.environ if environ is None else environ
  for name in DATA_DIR_VARIABLES:
    if environ.get(name):
      return os.path.expanduser(environ[name])
  return os.path.expanduser(CACHE_DIR)


def data_dir_of(data_config):
  return os.path.expanduser(data_config.data_dir or default_data_dir())


def center_crop(image, crop, size):
  """The central crop x crop square (smaller if the image is), resized bicubically to `size`."""
  h, w = image.shape[:2]
  c = min(crop, h, w)
  top, left = (h - c) // 2, (w - c) // 2
  square = PIL.Image.fromarray(image[top : top + c, left : left + c])
  return np.asarray(square.resize((size[1], size[0]), PIL.Image.BICUBIC))
