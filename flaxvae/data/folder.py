"""`flaxvae prepare-data folder`: a user's images (PNG/JPEG/BMP files or .npy arrays) -> a dataset.

    flaxvae prepare-data folder --source DIR --name NAME [--test_fraction 0.1]

DIR holds either image files / .npy arrays directly (label 0), or one sub-folder per label
(labels 0, 1, ... in sorted folder-name order). Files are taken in sorted path order; example i of
a split is its i-th file (or array row) in that order. All images must share one size and channel
count: the first one that differs is named. The result is flaxvae's raw-bytes ArrayRecord schema,
so training decodes nothing; every split's pixels round-trip bit-exactly.
"""

import os
import re

import numpy as np
import PIL.Image

from flaxvae.data import catalog, records, registry
from flaxvae.errors import DataError, one_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
CHANNELS = {"L": 1, "RGB": 3, "RGBA": 4, "1": 1, "P": 3}  # "1" -> L and "P" -> RGB on read
SPLIT_SEED = 0  # the train/test assignment is fixed: the same folder always splits the same way


def _entries(source):
  """[(path, label)] of every image file / .npy in `source`, in sorted order."""
  if not os.path.isdir(source):
    raise DataError(f"--source {source} is not a folder: point it at a folder of images")
  names = sorted(os.listdir(source))
  subdirs = [n for n in names if os.path.isdir(os.path.join(source, n)) and not n.startswith(".")]
  groups = [(os.path.join(source, d), label) for label, d in enumerate(subdirs)] or [(source, 0)]
  found = []
  for folder, label in groups:
    for name in sorted(os.listdir(folder)):
      if name.lower().endswith(IMAGE_SUFFIXES + (".npy",)):
        found.append((os.path.join(folder, name), label))
  if not found:
    raise DataError(
      f"--source {source} has no images ({', '.join(IMAGE_SUFFIXES)}) or .npy "
      "files, neither directly nor in one sub-folder per label"
    )
  return found


def _shape_of(path):
  """(count, (H, W, C)) from the header only: .npy [N,H,W(,C)] or one image file."""
  if path.endswith(".npy"):
    try:
      array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
      raise DataError(f"cannot read {path} ({e}): fix or remove it") from None
    if array.dtype != np.uint8 or array.ndim not in (3, 4):
      raise DataError(
        f"{path} must hold uint8 images [N, H, W] or [N, H, W, C], got "
        f"{array.dtype} {list(array.shape)}"
      )
    shape = array.shape[1:] if array.ndim == 4 else (*array.shape[1:], 1)
    return len(array), tuple(int(d) for d in shape)
  try:
    with PIL.Image.open(path) as image:
      mode, (width, height) = image.mode, image.size
  except Exception as e:  # PIL raises many types
    raise DataError(f"cannot read image {path} ({one_line(e)}): fix or remove it") from None
  if mode not in CHANNELS:
    raise DataError(f"image {path} has mode {mode}: convert it to L (grey), RGB or RGBA")
  return 1, (height, width, CHANNELS[mode])


def _images_of(path):
  """uint8 [n, H, W, C] of one .npy file or image file."""
  if path.endswith(".npy"):
    array = np.load(path, mmap_mode="r")
    return array if array.ndim == 4 else array[..., None]
  with PIL.Image.open(path) as image:
    image = image.convert({"1": "L", "P": "RGB"}.get(image.mode, image.mode))
    array = np.asarray(image)
  return (array[..., None] if array.ndim == 2 else array)[None]


def scan(source):
  """([(path, label, count)], image_shape): every input checked for one common size."""
  items, shape, first = [], None, None
  for path, label in _entries(source):
    count, this = _shape_of(path)
    if shape is None:
      shape, first = this, path
    elif this != shape:
      raise DataError(
        f"{path} is {this[0]}x{this[1]}x{this[2]} but {first} (the first input) is "
        f"{shape[0]}x{shape[1]}x{shape[2]}: all images must share one size; "
        "resize or remove it"
      )
    items.append((path, label, count))
  return items, shape


def split_assignment(total, test_fraction):
  """Boolean mask over examples: True for test. A fixed shuffle, so reruns agree."""
  if not 0 <= test_fraction < 1:
    raise DataError(f"--test_fraction must be in [0, 1), got {test_fraction}")
  num_test = int(round(total * test_fraction))
  if test_fraction and (num_test == 0 or num_test == total):
    raise DataError(f"--test_fraction {test_fraction} of {total} examples leaves an empty split")
  mask = np.zeros(total, bool)
  mask[np.random.default_rng(SPLIT_SEED).permutation(total)[:num_test]] = True
  return mask


def prepare_folder(source, name, test_fraction=0.0, data_dir=None):
  """Converts `source` into dataset `name` under data_dir; returns the builder dir."""
  if not re.fullmatch(r"[a-z][a-z0-9_]*", name or ""):
    raise DataError(
      f"--name {name!r} must be lower-case letters, digits and _, starting with a letter"
    )
  if name in registry.DATASETS:
    raise DataError(f"--name {name} is a catalog dataset: pick another name for your images")
  data_dir = os.path.expanduser(data_dir or catalog.default_data_dir())
  existing = records.latest_version_dir(os.path.join(data_dir, name))
  if existing:
    raise DataError(
      f"dataset {name} already exists in {existing}: delete that folder to "
      "rebuild it, or choose another --name"
    )
  items, shape = scan(os.path.expanduser(source))
  total = sum(count for _, _, count in items)
  is_test = split_assignment(total, test_fraction)

  def examples(want_test):
    def generate():
      k = 0
      for path, label, count in items:
        images = _images_of(path)
        for j in range(count):
          if is_test[k + j] == want_test:
            yield np.ascontiguousarray(images[j]), label
        k += count

    return generate

  splits = {"train": examples(False)}
  if test_fraction:
    splits["test"] = examples(True)
  sizes = {"train": int(total - is_test.sum()), "test": int(is_test.sum())}
  return records.write_dataset(data_dir, name, shape, splits, sizes=sizes)
