"""flaxvae.data.fashion_mnist: IDX files -> ArrayRecord (records.write_dataset) -> arrays,
checked on tiny fake data (and on the real files where Debian's package is installed)."""

import gzip
import os

import numpy as np
import pytest

from flaxvae import data as data_lib
from flaxvae import defaults
from flaxvae.data import fashion_mnist, records
from flaxvae.errors import DataError

REAL_SOURCE = fashion_mnist.DEFAULT_SOURCE_DIR


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
  for (split, prefix), n, gz in zip(fashion_mnist.SPLITS.items(), sizes, (gz_train, gz_test)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    write_idx(folder / f"{prefix}-images-idx3-ubyte", images, gz)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz)
    arrays[split] = (images, labels)
  return arrays


def tfds_examples(builder_dir, split):
  """[{"image", "label", "index"}] in stored order, decoded by TFDS itself (slow, independent)."""
  import tensorflow_datasets as tfds

  source = tfds.builder_from_directory(builder_dir).as_data_source(split)
  return [source[i] for i in range(len(source))]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """One tiny prepared dataset shared by the read-only tests: (source arrays, builder_dir)."""
  root = tmp_path_factory.mktemp("prepared")
  arrays = fake_source(root / "src")
  return arrays, fashion_mnist.prepare_fashion_mnist(str(root / "src"), str(root / "data"))


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trip(tmp_path, gz):
  array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  write_idx(tmp_path / "x", array, gz)
  got = fashion_mnist.read_idx(tmp_path / ("x.gz" if gz else "x"))
  assert got.dtype == np.uint8 and np.array_equal(got, array)


@pytest.mark.parametrize("damage", ["truncated", "too_long", "magic", "empty", "bad_gzip"])
def test_read_idx_rejects_damaged_files(tmp_path, damage):
  data = idx_bytes(np.zeros((2, 28, 28), np.uint8))
  data = {
    "truncated": data[:-5],
    "too_long": data + b"\0",
    "magic": b"\1" + data[1:],
    "empty": b"",
    "bad_gzip": b"not gzip at all",
  }[damage]
  path = tmp_path / ("x.gz" if damage == "bad_gzip" else "x")
  path.write_bytes(data)
  with pytest.raises(DataError, match=str(path)) as e:
    fashion_mnist.read_idx(path)
  assert "\n" not in str(e.value)


def test_round_trip_in_idx_order(prepared):
  arrays, builder_dir = prepared
  assert builder_dir.endswith(os.path.join(fashion_mnist.NAME, fashion_mnist.VERSION))
  assert builder_dir.endswith(os.path.join("fashion_mnist_idx", "1.0.0"))
  for split, (images, labels) in arrays.items():
    got_images = records.Split(builder_dir, split).read_all()
    assert got_images.dtype == np.uint8
    assert got_images.shape == (len(labels), *fashion_mnist.IMAGE_SHAPE) == (len(labels), 28, 28, 1)
    np.testing.assert_array_equal(got_images[..., 0], images)


def test_fast_reader_agrees_with_tfds_decoder(prepared):
  """Split parses protos itself; TFDS's own (slow) decoder must see the same examples, and the
  labels flaxvae no longer reads are still stored, in IDX order."""
  arrays, builder_dir = prepared
  examples = tfds_examples(builder_dir, "train")
  stored_order = [int(e["index"]) for e in examples]
  assert sorted(stored_order) == list(range(7)) and stored_order != list(range(7))  # TFDS shuffled
  images = records.Split(builder_dir, "train").read_all()
  labels = arrays["train"][1]
  for e in examples:
    np.testing.assert_array_equal(e["image"], images[e["index"]])
    assert e["label"] == labels[e["index"]]


def test_prepare_is_idempotent(prepared, tmp_path):
  _, builder_dir = prepared
  mtimes = {f: os.stat(os.path.join(builder_dir, f)).st_mtime_ns for f in os.listdir(builder_dir)}
  data_dir = os.path.dirname(os.path.dirname(builder_dir))
  # The source is not even read again: a missing one does not matter once prepared, and the
  # files written before are left as they were.
  assert fashion_mnist.prepare_fashion_mnist(str(tmp_path / "gone"), data_dir) == builder_dir
  assert mtimes == {
    f: os.stat(os.path.join(builder_dir, f)).st_mtime_ns for f in os.listdir(builder_dir)
  }


def test_prepared_dataset_reads_fashion_mnist(prepared, tmp_path):
  """data.name fashion_mnist reads the prepared folder under data.data_dir (no source needed)."""
  arrays, builder_dir = prepared
  config = defaults.base_config()
  config.data.data_dir = os.path.dirname(os.path.dirname(builder_dir))
  config.data.source_dir = str(tmp_path / "gone")
  dataset = data_lib.PreparedDataset(config.data)
  assert dataset.builder_dir == builder_dir
  np.testing.assert_array_equal(dataset.images("test")[..., 0], arrays["test"][0])
  # Split sizes are known without reading: the real dataset's.
  assert dataset.split_bytes("train") == fashion_mnist.SPLIT_SIZES["train"] * 28 * 28


def test_unknown_split(prepared):
  with pytest.raises(DataError, match=r"'validation'.*test, train"):
    records.Split(prepared[1], "validation")


def test_not_prepared(tmp_path):
  with pytest.raises(DataError, match="not prepared.*flaxvae prepare-data") as e:
    records.Split(str(tmp_path / "fashion_mnist_idx" / "1.0.0"), "train")
  assert "\n" not in str(e.value)
  # Through a run's dataset, Fashion-MNIST is prepared on first use: with no source, it says how.
  config = defaults.base_config()
  config.data.data_dir, config.data.source_dir = str(tmp_path / "data"), str(tmp_path / "none")
  with pytest.raises(DataError, match="has no Fashion-MNIST IDX files.*make install"):
    data_lib.PreparedDataset(config.data).images("train")


def test_missing_source_folder(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(DataError, match=f"{missing} has no Fashion-MNIST IDX files") as e:
    fashion_mnist.prepare_fashion_mnist(str(missing), str(tmp_path / "data"))
  assert "make install" in str(e.value) and "\n" not in str(e.value)
  assert not (tmp_path / "data" / "fashion_mnist_idx" / "1.0.0").exists()


def test_missing_one_file(tmp_path):
  fake_source(tmp_path / "src")
  os.remove(tmp_path / "src" / "t10k-labels-idx1-ubyte")
  with pytest.raises(DataError, match=r"lacks t10k-labels-idx1-ubyte\[\.gz\]"):
    fashion_mnist.prepare_fashion_mnist(str(tmp_path / "src"), str(tmp_path / "data"))


def test_corrupt_source_file_is_named(tmp_path):
  fake_source(tmp_path / "src")
  bad = tmp_path / "src" / "t10k-images-idx3-ubyte"
  bad.write_bytes(bad.read_bytes()[:-1])
  with pytest.raises(DataError, match=str(bad)):
    fashion_mnist.prepare_fashion_mnist(str(tmp_path / "src"), str(tmp_path / "data"))


def test_image_and_label_counts_must_match(tmp_path):
  fake_source(tmp_path / "src")
  write_idx(tmp_path / "src" / "train-labels-idx1-ubyte", np.zeros(6, np.uint8), gz=True)
  with pytest.raises(DataError, match="7 images but .*train-labels.* has 6 labels"):
    fashion_mnist.prepare_fashion_mnist(str(tmp_path / "src"), str(tmp_path / "data"))


def test_labels_file_in_place_of_images(tmp_path):
  fake_source(tmp_path / "src")
  write_idx(tmp_path / "src" / "train-images-idx3-ubyte", np.zeros(7, np.uint8), gz=True)
  with pytest.raises(DataError, match="train-images-idx3-ubyte.gz is not a Fashion-MNIST"):
    fashion_mnist.prepare_fashion_mnist(str(tmp_path / "src"), str(tmp_path / "data"))


def test_failed_prepare_is_redone(tmp_path, capsys):
  arrays = fake_source(tmp_path / "src")
  src, data = str(tmp_path / "src"), str(tmp_path / "data")
  builder_dir = os.path.join(data, "fashion_mnist_idx", "1.0.0")

  def dies_half_way():  # fault injection: the examples a prepare writes run out in a fire
    images, labels = arrays["train"]
    yield from zip(images[:2, ..., None], labels[:2])
    raise RuntimeError("disk on fire")

  with pytest.raises(RuntimeError, match="disk on fire"):  # the write prepare_fashion_mnist does
    records.write_dataset(
      data,
      fashion_mnist.NAME,
      fashion_mnist.IMAGE_SHAPE,
      {"train": dies_half_way},
      version=fashion_mnist.VERSION,
    )
  assert os.listdir(os.path.join(data, "fashion_mnist_idx")) == []  # TFDS removed its temp folder
  with pytest.raises(DataError, match="not prepared"):
    records.Split(builder_dir, "train")
  # What a killed process leaves behind: TFDS's temporary folder and, say, a stray target folder.
  os.makedirs(os.path.join(data, "fashion_mnist_idx", "incomplete.KILLED_1.0.0"))
  os.makedirs(builder_dir)
  open(
    os.path.join(builder_dir, "fashion_mnist_idx-train.array_record-00000-of-00001"), "w"
  ).close()
  capsys.readouterr()
  assert fashion_mnist.prepare_fashion_mnist(src, data) == builder_dir
  # Preparing prints one progress line per split (sizes known), and nothing of TFDS's.
  out = capsys.readouterr().out
  assert "preparing fashion_mnist_idx/train 7/7 (100%)" in out
  assert "preparing fashion_mnist_idx/test 3/3 (100%)" in out
  np.testing.assert_array_equal(
    records.Split(builder_dir, "train").read_all()[..., 0], arrays["train"][0]
  )
  for e in tfds_examples(builder_dir, "train"):
    assert e["label"] == arrays["train"][1][e["index"]]


@pytest.mark.skipif(not os.path.isdir(REAL_SOURCE), reason=f"{REAL_SOURCE} absent")
def test_real_fashion_mnist(tmp_path):
  builder_dir = fashion_mnist.prepare_fashion_mnist(None, str(tmp_path))
  for split, prefix in fashion_mnist.SPLITS.items():
    images = records.Split(builder_dir, split).read_all()
    assert images.shape == (fashion_mnist.SPLIT_SIZES[split], 28, 28, 1)
    np.testing.assert_array_equal(
      images[..., 0],
      fashion_mnist.read_idx(os.path.join(REAL_SOURCE, f"{prefix}-images-idx3-ubyte.gz")),
    )
  assert fashion_mnist.SPLIT_SIZES == {"train": 60_000, "test": 10_000}
