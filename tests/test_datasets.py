"""flaxvae.datasets: IDX files -> TFDS ArrayRecord -> arrays, checked on tiny fake data."""
import gzip
import os
import time

import numpy as np
import pytest

from flaxvae import datasets

REAL_SOURCE = datasets.DEFAULT_SOURCE_DIR


def idx_bytes(array):
  """`array` (uint8) as an IDX file: magic 0x0000 08 ndim, big-endian dims, then the bytes."""
  header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  return header + np.ascontiguousarray(array, np.uint8).tobytes()


def write_idx(path, array, gz):
  with (gzip.open if gz else open)(str(path) + (".gz" if gz else ""), "wb") as f:
    f.write(idx_bytes(array))


def fake_source(folder, sizes=(7, 3), gz_train=True, gz_test=False):
  """IDX files for train and test (gz and raw mixed); returns {split: (images, labels)}."""
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  arrays = {}
  for (split, prefix), n, gz in zip(datasets.SPLITS.items(), sizes, (gz_train, gz_test)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    write_idx(folder / f"{prefix}-images-idx3-ubyte", images, gz)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz)
    arrays[split] = (images, labels)
  return arrays


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """One tiny prepared dataset shared by the read-only tests: (source arrays, builder_dir)."""
  root = tmp_path_factory.mktemp("prepared")
  arrays = fake_source(root / "src")
  return arrays, datasets.prepare_fashion_mnist(str(root / "src"), str(root / "data"))


def test_default_data_dir(monkeypatch):
  monkeypatch.setenv("FLAXVAE_DATA_DIR", "/some/where")
  assert datasets.default_data_dir() == "/some/where"
  monkeypatch.delenv("FLAXVAE_DATA_DIR")
  assert datasets.default_data_dir() == os.path.expanduser("~/.cache/flaxvae/tfds")


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trip(tmp_path, gz):
  array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  write_idx(tmp_path / "x", array, gz)
  got = datasets.read_idx(tmp_path / ("x.gz" if gz else "x"))
  assert got.dtype == np.uint8 and np.array_equal(got, array)


@pytest.mark.parametrize("damage", ["truncated", "too_long", "magic", "empty", "bad_gzip"])
def test_read_idx_rejects_damaged_files(tmp_path, damage):
  data = idx_bytes(np.zeros((2, 28, 28), np.uint8))
  data = {"truncated": data[:-5], "too_long": data + b"\0", "magic": b"\1" + data[1:],
          "empty": b"", "bad_gzip": b"not gzip at all"}[damage]
  path = tmp_path / ("x.gz" if damage == "bad_gzip" else "x")
  path.write_bytes(data)
  with pytest.raises(datasets.DataError, match=str(path)) as e:
    datasets.read_idx(path)
  assert "\n" not in str(e.value)


def test_round_trip_in_idx_order(prepared):
  arrays, builder_dir = prepared
  assert builder_dir.endswith(os.path.join("fashion_mnist_idx", "1.0.0"))
  for split, (images, labels) in arrays.items():
    got_images, got_labels = datasets.load_split(builder_dir, split)
    assert got_images.dtype == np.uint8 and got_images.shape == (len(labels), 28, 28, 1)
    assert got_labels.dtype == np.int64 and got_labels.shape == (len(labels),)
    np.testing.assert_array_equal(got_images[..., 0], images)
    np.testing.assert_array_equal(got_labels, labels)


def test_fast_reader_agrees_with_tfds_decoder(prepared):
  """load_split parses protos itself; TFDS's own (slow) decoder must see the same examples."""
  import tensorflow_datasets as tfds
  arrays, builder_dir = prepared
  source = tfds.builder_from_directory(builder_dir).as_data_source("train")
  examples = [source[i] for i in range(len(source))]
  stored_order = [int(e["index"]) for e in examples]
  assert sorted(stored_order) == list(range(7)) and stored_order != list(range(7))  # TFDS shuffled
  images, labels = datasets.load_split(builder_dir, "train")
  for e in examples:
    np.testing.assert_array_equal(e["image"], images[e["index"]])
    assert e["label"] == labels[e["index"]]


def test_prepare_is_idempotent(prepared, tmp_path):
  _, builder_dir = prepared
  mtimes = {f: os.stat(os.path.join(builder_dir, f)).st_mtime_ns for f in os.listdir(builder_dir)}
  data_dir = os.path.dirname(os.path.dirname(builder_dir))
  start = time.perf_counter()
  # The source is not even read again: a missing one does not matter once prepared.
  assert datasets.prepare_fashion_mnist(str(tmp_path / "gone"), data_dir) == builder_dir
  assert time.perf_counter() - start < 1.0
  assert mtimes == {f: os.stat(os.path.join(builder_dir, f)).st_mtime_ns
                    for f in os.listdir(builder_dir)}


def test_unknown_split(prepared):
  with pytest.raises(datasets.DataError, match=r"'validation'.*test, train"):
    datasets.load_split(prepared[1], "validation")


def test_not_prepared(tmp_path):
  with pytest.raises(datasets.DataError, match="flaxvae prepare-data fashion_mnist"):
    datasets.load_split(str(tmp_path / "fashion_mnist_idx" / "1.0.0"), "train")


def test_missing_source_folder(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(datasets.DataError, match=f"{missing} has no Fashion-MNIST IDX files") as e:
    datasets.prepare_fashion_mnist(str(missing), str(tmp_path / "data"))
  assert "make install" in str(e.value) and "\n" not in str(e.value)
  assert not (tmp_path / "data" / "fashion_mnist_idx" / "1.0.0").exists()


def test_missing_one_file(tmp_path):
  fake_source(tmp_path / "src")
  os.remove(tmp_path / "src" / "t10k-labels-idx1-ubyte")
  with pytest.raises(datasets.DataError, match=r"lacks t10k-labels-idx1-ubyte\[\.gz\]"):
    datasets.prepare_fashion_mnist(str(tmp_path / "src"), str(tmp_path / "data"))


def test_corrupt_source_file_is_named(tmp_path):
  fake_source(tmp_path / "src")
  bad = tmp_path / "src" / "t10k-images-idx3-ubyte"
  bad.write_bytes(bad.read_bytes()[:-1])
  with pytest.raises(datasets.DataError, match=str(bad)):
    datasets.prepare_fashion_mnist(str(tmp_path / "src"), str(tmp_path / "data"))


def test_image_and_label_counts_must_match(tmp_path):
  fake_source(tmp_path / "src")
  write_idx(tmp_path / "src" / "train-labels-idx1-ubyte", np.zeros(6, np.uint8), gz=True)
  with pytest.raises(datasets.DataError, match="7 images but .*train-labels.* has 6 labels"):
    datasets.prepare_fashion_mnist(str(tmp_path / "src"), str(tmp_path / "data"))


def test_labels_file_in_place_of_images(tmp_path):
  fake_source(tmp_path / "src")
  write_idx(tmp_path / "src" / "train-images-idx3-ubyte", np.zeros(7, np.uint8), gz=True)
  with pytest.raises(datasets.DataError, match="train-images-idx3-ubyte.gz is not a Fashion-MNIST"):
    datasets.prepare_fashion_mnist(str(tmp_path / "src"), str(tmp_path / "data"))


def test_failed_prepare_is_redone(tmp_path, monkeypatch):
  arrays = fake_source(tmp_path / "src")
  src, data = str(tmp_path / "src"), str(tmp_path / "data")
  builder_dir = os.path.join(data, "fashion_mnist_idx", "1.0.0")
  good = datasets._FashionMnistIdx._generate_examples

  def dies_half_way(self, split):
    yield from list(good(self, split))[:2]
    raise RuntimeError("disk on fire")

  monkeypatch.setattr(datasets._FashionMnistIdx, "_generate_examples", dies_half_way)
  with pytest.raises(RuntimeError, match="disk on fire"):
    datasets.prepare_fashion_mnist(src, data)
  assert os.listdir(os.path.join(data, "fashion_mnist_idx")) == []  # TFDS removed its temp folder
  with pytest.raises(datasets.DataError, match="not prepared"):
    datasets.load_split(builder_dir, "train")
  # What a killed process leaves behind: TFDS's temporary folder and, say, a stray target folder.
  os.makedirs(os.path.join(data, "fashion_mnist_idx", "incomplete.KILLED_1.0.0"))
  os.makedirs(builder_dir)
  open(os.path.join(builder_dir, "fashion_mnist_idx-train.array_record-00000-of-00001"), "w").close()
  monkeypatch.setattr(datasets._FashionMnistIdx, "_generate_examples", good)
  assert datasets.prepare_fashion_mnist(src, data) == builder_dir
  images, labels = datasets.load_split(builder_dir, "train")
  np.testing.assert_array_equal(images[..., 0], arrays["train"][0])
  np.testing.assert_array_equal(labels, arrays["train"][1])


@pytest.mark.skipif(not os.path.isdir(REAL_SOURCE), reason=f"{REAL_SOURCE} absent")
def test_real_fashion_mnist(tmp_path):
  builder_dir = datasets.prepare_fashion_mnist(None, str(tmp_path))
  images, labels = datasets.load_split(builder_dir, "train")
  assert images.shape == (60000, 28, 28, 1) and labels.shape == (60000,)
  np.testing.assert_array_equal(
      labels, datasets.read_idx(os.path.join(REAL_SOURCE, "train-labels-idx1-ubyte.gz")))
  images, labels = datasets.load_split(builder_dir, "test")
  assert images.shape == (10000, 28, 28, 1) and labels.shape == (10000,)
  assert set(np.unique(labels)) == set(range(10))
