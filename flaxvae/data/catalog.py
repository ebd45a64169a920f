"""Where prepared datasets live, the catalog of known datasets, and preparing catalog datasets.

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

from flaxvae.data import records
from flaxvae.errors import DataError

log = logging.getLogger("flaxvae")

CACHE_DIR = "~/.cache/flaxvae/tfds"
DATA_DIR_VARIABLES = ("FLAXVAE_DATA_DIR", "TFDS_DATA_DIR")  # in this order, after data.data_dir


@dataclasses.dataclass(frozen=True)
class CatalogEntry:
  tfds_name: str  # the TFDS catalog builder (and its folder under data_dir)
  image_shape: tuple
  split_sizes: dict
  scale: int = 1  # multiply stored values by this to get 0..255 (binarized_mnist stores 0/1)
  crop: int = 0  # > 0: a derived dataset of centre crops of this size, resized to image_shape


CATALOG = {
    "mnist": CatalogEntry("mnist", (28, 28, 1), {"train": 60_000, "test": 10_000}),
    "binarized_mnist": CatalogEntry("binarized_mnist", (28, 28, 1),
                                    {"train": 50_000, "validation": 10_000, "test": 10_000},
                                    scale=255),
    "cifar10": CatalogEntry("cifar10", (32, 32, 3), {"train": 50_000, "test": 10_000}),
    "celeb_a": CatalogEntry("celeb_a", (64, 64, 3),
                            {"train": 162_770, "validation": 19_867, "test": 19_962}, crop=140),
    "imagenet32": CatalogEntry("downsampled_imagenet/32x32", (32, 32, 3),
                               {"train": 1_281_167, "validation": 50_000}),
    "imagenet64": CatalogEntry("downsampled_imagenet/64x64", (64, 64, 3),
                               {"train": 1_281_167, "validation": 50_000}),
}
CATALOG["downsampled_imagenet"] = CATALOG["imagenet32"]
# Datasets the user prepares from their own files (`prepare-data folder --name NAME`) whose
# shape the shipped configs rely on, so they compile ahead of time without the data.
FOLDER_SHAPES = {"ffhq256": (256, 256, 3)}
DERIVED_SUFFIX = "_crops"  # celeb_a -> celeb_a_crops: the 64x64 crops flaxvae derives once


def default_data_dir(environ=None) -> str:
  """$FLAXVAE_DATA_DIR, else $TFDS_DATA_DIR, else ~/.cache/flaxvae/tfds."""
  environ = os.environ if environ is None else environ
  for name in DATA_DIR_VARIABLES:
    if environ.get(name):
      return os.path.expanduser(environ[name])
  return os.path.expanduser(CACHE_DIR)


def data_dir_of(data_config):
  return os.path.expanduser(data_config.data_dir or default_data_dir())


def prepare_command(name):
  if name == "fashion_mnist" or name in CATALOG:
    return f"flaxvae prepare-data {name}"
  return f"flaxvae prepare-data folder --source DIR --name {name}"


def catalog_builder_dir(name, data_dir):
  """The prepared folder of catalog dataset `name`; DataError naming the command if none."""
  entry = CATALOG[name]
  folder = entry.tfds_name + (DERIVED_SUFFIX if entry.crop else "")
  found = records.latest_version_dir(os.path.join(data_dir, folder))
  if found is None:
    raise DataError(f"dataset {name} is not prepared in {data_dir}: run `{prepare_command(name)}`"
                    " once (needs `pip install 'flaxvae[prep]'` and internet), or set "
                    "data.data_dir / $FLAXVAE_DATA_DIR / $TFDS_DATA_DIR to where it was prepared")
  return found


def folder_builder_dir(name, data_dir):
  found = records.latest_version_dir(os.path.join(data_dir, name))
  if found is None:
    raise DataError(f"dataset {name!r} is not prepared in {data_dir}: run "
                    f"`{prepare_command(name)}` (catalog: fashion_mnist, "
                    f"{', '.join(sorted(CATALOG))})")
  return found


def prepare_catalog(name, data_dir=None):
  """Downloads and prepares a catalog dataset as ArrayRecord (needs TF); returns its folder."""
  entry = CATALOG[name]
  data_dir = os.path.expanduser(data_dir or default_data_dir())
  folder = os.path.join(data_dir, entry.tfds_name)
  done = records.latest_version_dir(folder + (DERIVED_SUFFIX if entry.crop else ""))
  if done:
    return done
  if records.latest_version_dir(folder) is None:
    try:
      import tensorflow  # noqa: F401  (optional: TFDS needs it to download and encode)
    except ImportError:
      raise DataError(f"preparing {name} needs TensorFlow and internet once: "
                      f"`pip install 'flaxvae[prep]'`, then `flaxvae prepare-data {name}` "
                      "(training then needs neither)") from None
    builder = tfds.builder(entry.tfds_name, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
  if entry.crop:
    return derive_crops(name, data_dir)
  return records.latest_version_dir(folder)


def derive_crops(name, data_dir):
  """The catalog dataset's images as centre crops resized to the entry's shape, raw bytes."""
  entry = CATALOG[name]
  source_dir = records.latest_version_dir(os.path.join(data_dir, entry.tfds_name))
  if source_dir is None:
    raise DataError(f"{entry.tfds_name} is not prepared in {data_dir}: run "
                    f"`flaxvae prepare-data {name}`")
  builder = tfds.builder_from_directory(source_dir)
  height, width = entry.image_shape[:2]

  def crops(split):
    def generate():
      source = records.Split(source_dir, split)
      for s in range(0, source.num_examples, 1024):
        for image in source.read(np.arange(s, min(s + 1024, source.num_examples))):
          yield center_crop(image, entry.crop, (height, width)), 0
    return generate

  log.info("Deriving %dx%d centre crops of %s (once)", height, width, name)
  return records.write_dataset(data_dir, entry.tfds_name + DERIVED_SUFFIX, entry.image_shape,
                               {split: crops(split) for split in builder.info.splits},
                               sizes={s: i.num_examples for s, i in builder.info.splits.items()})


def center_crop(image, crop, size):
  """The central crop x crop square (smaller if the image is), resized bicubically to `size`."""
  h, w = image.shape[:2]
  c = min(crop, h, w)
  top, left = (h - c) // 2, (w - c) // 2
  square = PIL.Image.fromarray(image[top:top + c, left:left + c])
  return np.asarray(square.resize((size[1], size[0]), PIL.Image.BICUBIC))
