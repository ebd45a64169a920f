"""Prepared datasets on disk: where they live (catalog), reading them without TensorFlow (records),
the folder converter, and clear failures.

Everything runs on tiny datasets this file writes itself (flaxvae's raw schema and the TFDS
catalog's PNG schema), so no download and no TensorFlow are needed.
"""

import os

import numpy as np
import PIL.Image
import pytest

from flaxvae import data as data_lib
from flaxvae import defaults
from flaxvae.data import catalog, feeds, folder, records, registry
from flaxvae.data.order import IndexStream
from flaxvae.errors import DataError
from tests.conftest import random_images

SHAPE = (6, 5, 3)


def config_for(data_dir, name, **data):
  config = defaults.base_config()
  config.data.name, config.data.data_dir = name, data_dir
  config.data.update(data)
  return config


def images_of(config, split):
  return data_lib.PreparedDataset(config.data).images(split)


def one_line(e):
  assert "\n" not in str(e.value)
  return str(e.value)


# ----------------------------------------------------------------------------
# Catalog: where prepared datasets live
# ----------------------------------------------------------------------------
def test_default_data_dir(monkeypatch):
  monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
  monkeypatch.setenv("FLAXVAE_DATA_DIR", "/some/where")
  assert catalog.default_data_dir() == "/some/where"
  monkeypatch.delenv("FLAXVAE_DATA_DIR")
  assert catalog.default_data_dir() == os.path.expanduser("~/.cache/flaxvae/tfds")


def test_default_data_dir_order():
  """$FLAXVAE_DATA_DIR, then $TFDS_DATA_DIR, then ~/.cache/flaxvae/tfds; empty values skipped."""
  both = {"FLAXVAE_DATA_DIR": "/flaxvae", "TFDS_DATA_DIR": "/tfds"}
  assert catalog.default_data_dir(both) == "/flaxvae"
  assert catalog.default_data_dir({"TFDS_DATA_DIR": "/tfds"}) == "/tfds"
  assert catalog.default_data_dir({"FLAXVAE_DATA_DIR": "", "TFDS_DATA_DIR": "/tfds"}) == "/tfds"
  assert catalog.default_data_dir({"TFDS_DATA_DIR": "~/td"}) == os.path.expanduser("~/td")
  assert catalog.default_data_dir({}) == os.path.expanduser("~/.cache/flaxvae/tfds")


def test_data_dir_in_the_config_wins(monkeypatch, tmp_path):
  monkeypatch.setenv("FLAXVAE_DATA_DIR", "/some/where")
  assert catalog.data_dir_of(config_for(str(tmp_path), "mine").data) == str(tmp_path)
  assert catalog.data_dir_of(config_for("", "mine").data) == "/some/where"


def test_center_crop_is_centered():
  """200x180 (H x W), crop 140: rows 30..170, columns 20..160, resized to 64x64."""
  image = np.zeros((200, 180, 3), np.uint8)
  image[30:170, 20:90] = 100  # the crop's left half
  image[30:170, 90:160] = 200  # its right half
  got = catalog.center_crop(image, 140, (64, 64))
  assert got.dtype == np.uint8 and got.shape == (64, 64, 3)
  # No pixel from outside the centre (0) gets in: a crop off by a few pixels would show them.
  assert np.all(got[:, :28] == 100) and np.all(got[:, 36:] == 200)
  assert got.min() >= 90  # bicubic ringing at the 100|200 edge only, never toward the border's 0
  # Height and width are not swapped: a non-square target keeps (h, w).
  assert catalog.center_crop(image, 140, (32, 48)).shape == (32, 48, 3)
  # An image smaller than the crop: its central square (here all of its 100 rows).
  small = np.full((100, 120, 1), 7, np.uint8)[..., 0]
  small[:, :10] = small[:, -10:] = 0
  assert np.all(catalog.center_crop(small, 140, (16, 16)) == 7)


def test_not_prepared_names_the_command(tmp_path):
  with pytest.raises(DataError) as e:
    data_lib.PreparedDataset(config_for(str(tmp_path), "cifar10").data).open_split("train")
  assert "flaxvae prepare-data cifar10" in one_line(e)
  with pytest.raises(DataError) as e:
    data_lib.PreparedDataset(config_for(str(tmp_path), "mine").data).open_split("train")
  assert "flaxvae prepare-data folder --source DIR --name mine" in one_line(e)


def test_registered_datasets_are_known_without_data_and_reserved(tmp_path):
  """Fashion-MNIST and the catalog register themselves: shapes and sizes need no prepared
  folder, and no folder dataset may take their names."""
  assert {
    "fashion_mnist",
    "mnist",
    "binarized_mnist",
    "cifar10",
    "celeb_a",
    "imagenet32",
    "imagenet64",
    "downsampled_imagenet",
  } <= set(registry.DATASETS.names())
  celeb_a = data_lib.PreparedDataset(config_for(str(tmp_path), "celeb_a").data)
  assert celeb_a.image_shape == (64, 64, 3)
  assert celeb_a.split_bytes("test") == 19_962 * 64 * 64 * 3
  ffhq = data_lib.PreparedDataset(config_for(str(tmp_path), "ffhq256").data)
  assert ffhq.image_shape == (256, 256, 3)  # a folder dataset whose shape the configs rely on
  for name in ("fashion_mnist", "cifar10"):
    with pytest.raises(DataError, match=f"--name {name} is a catalog dataset"):
      folder.prepare_folder(str(tmp_path), name, 0.0, str(tmp_path / "data"))


def test_catalog_preparation_without_tensorflow_says_how(tmp_path):
  try:
    import tensorflow  # noqa: F401

    pytest.skip("TensorFlow is installed: preparing would download")
  except ImportError:
    pass
  with pytest.raises(DataError) as e:
    registry.DATASETS.get("cifar10").prepare(str(tmp_path))
  assert "pip install 'flaxvae[prep]'" in one_line(e)


# ----------------------------------------------------------------------------
# Records: the catalog's schema (PNG images, no `index`) and flaxvae's, read without TensorFlow
# ----------------------------------------------------------------------------
def test_catalog_schema_reads_on_both_paths(tmp_path):
  images = random_images(30, seed=2, shape=(4, 4, 1)) // 255  # binarized_mnist stores 0/1
  records.write_dataset(
    str(tmp_path),
    "binarized_mnist",
    (4, 4, 1),
    {"train": lambda: ((im, 0) for im in images)},
    version="1.0.0",
    encoding="png",
  )
  dataset = data_lib.PreparedDataset(config_for(str(tmp_path), "binarized_mnist").data)
  loaded = dataset.images("train")
  assert loaded.dtype == np.uint8 and set(np.unique(loaded)) <= {0, 255}
  assert sorted(map(bytes, loaded)) == sorted(map(bytes, images * 255))  # record order, scaled
  split = dataset.open_split("train")
  assert split.scale == 255 and split.encoded and not split.has_index
  stream = IndexStream(30, seed=0)
  batches = feeds.StreamingBatches(split, 0, 8, read_threads=2, prefetch_batches=4)
  assert np.array_equal(batches.take(5), loaded[stream.take(40).reshape(5, 8)])


def test_write_dataset_progress_lines(tmp_path, capsys):
  images = random_images(5, seed=3, shape=SHAPE)
  write = lambda name, **kw: records.write_dataset(
    str(tmp_path), name, SHAPE, {"train": lambda: ((im, 0) for im in images)}, **kw
  )
  builder_dir = write("quiet")
  assert capsys.readouterr().out == ""  # TFDS's own chatter is silenced
  assert builder_dir == os.path.join(str(tmp_path), "quiet", records.FOLDER_VERSION)
  assert records.latest_version_dir(os.path.join(str(tmp_path), "quiet")) == builder_dir
  write("loud", sizes={"train": 5})
  assert "preparing loud/train 5/5 (100%)" in capsys.readouterr().out
  assert np.array_equal(records.Split(builder_dir, "train").read_all(), images)


def test_latest_version_dir_skips_incomplete_versions(tmp_path):
  assert records.latest_version_dir(str(tmp_path / "none")) is None
  for version, complete in (("1.0.0", True), ("1.2.0", True), ("1.10.0", False)):
    os.makedirs(tmp_path / "ds" / version)
    if complete:
      (tmp_path / "ds" / version / "dataset_info.json").write_text("{}")
  assert records.latest_version_dir(str(tmp_path / "ds")) == str(tmp_path / "ds" / "1.2.0")


def test_order_is_cached_beside_the_dataset(tmp_path):
  images = random_images(12, seed=5, shape=SHAPE)
  builder_dir = records.write_dataset(
    str(tmp_path), "cached", SHAPE, {"train": lambda: ((im, 0) for im in images)}
  )
  path = os.path.join(builder_dir, "flaxvae-order-train.npy")
  order = np.load(path)
  split = records.Split(builder_dir, "train")
  assert np.array_equal(records.load_or_build_order(split), order)
  os.remove(path)  # rebuilt from the records when the cache is gone
  assert np.array_equal(records.load_or_build_order(split), order)
  assert np.array_equal(split.read(np.arange(12)), images)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_record_file_is_named(tmp_path, damage):
  images = random_images(40, seed=4, shape=SHAPE)
  builder_dir = records.write_dataset(
    str(tmp_path), "fragile", SHAPE, {"train": lambda: ((im, 0) for im in images)}
  )
  path = next(
    os.path.join(builder_dir, f) for f in os.listdir(builder_dir) if "train.array_record" in f
  )
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(
      data[: len(data) // 2]
      if damage == "truncated"
      else data[:200] + bytes(255 - b for b in data[200 : len(data) - 200]) + data[-200:]
    )
  with pytest.raises(DataError) as e:
    split = records.Split(builder_dir, "train")
    split.read_all()
  assert path in one_line(e)


# ----------------------------------------------------------------------------
# Folder converter
# ----------------------------------------------------------------------------
def test_folder_round_trips_bit_exactly_with_labels_and_split(tmp_path):
  source = tmp_path / "src"
  expected = []
  for label, name in enumerate(["cats", "dogs"]):
    (source / name).mkdir(parents=True)
    for i, image in enumerate(random_images(4, seed=label, shape=(7, 9, 3))):
      PIL.Image.fromarray(image).save(source / name / f"{i}.png")
      expected.append(image)
  arrays = random_images(3, seed=9, shape=(7, 9, 3))
  np.save(source / "dogs" / "z_more.npy", arrays)  # sorts after the PNGs of `dogs`
  expected = np.stack(expected[:8] + list(arrays))
  builder_dir = folder.prepare_folder(str(source), "pets", 0.25, str(tmp_path / "data"))
  is_test = folder.split_assignment(len(expected), 0.25)
  config = config_for(str(tmp_path / "data"), "pets")
  assert np.array_equal(images_of(config, "train"), expected[~is_test])
  assert np.array_equal(images_of(config, "test"), expected[is_test])
  assert os.path.isfile(os.path.join(builder_dir, "flaxvae-order-train.npy"))
  with pytest.raises(DataError, match="already exists"):
    folder.prepare_folder(str(source), "pets", 0.25, str(tmp_path / "data"))


def test_folder_grey_images(tmp_path):
  images = random_images(3, shape=(5, 5, 1))
  for i, image in enumerate(images):
    PIL.Image.fromarray(image[..., 0]).save(tmp_path / f"{i}.png")
  folder.prepare_folder(str(tmp_path), "grey", 0.0, str(tmp_path / "data"))
  assert np.array_equal(images_of(config_for(str(tmp_path / "data"), "grey"), "train"), images)


def test_mixed_sizes_name_the_first_offender(tmp_path):
  PIL.Image.fromarray(random_images(1, shape=(5, 5, 3))[0]).save(tmp_path / "a.png")
  PIL.Image.fromarray(random_images(1, shape=(6, 5, 3))[0]).save(tmp_path / "b.png")
  PIL.Image.fromarray(random_images(1, shape=(7, 5, 3))[0]).save(tmp_path / "c.png")
  with pytest.raises(DataError) as e:
    folder.prepare_folder(str(tmp_path), "mixed", 0.0, str(tmp_path / "data"))
  assert str(tmp_path / "b.png") in one_line(e) and "c.png" not in str(e.value)
  assert not os.path.exists(tmp_path / "data" / "mixed")
