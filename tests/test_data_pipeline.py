"""Input pipelines: sharding, one order on both paths, exact resume, the folder converter, errors.

Everything runs on tiny datasets this file writes itself (flaxvae's raw schema and the TFDS
catalog's PNG schema), so no download and no TensorFlow are needed.
"""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

from flaxvae import checkpoint as checkpoint_lib
from flaxvae import data as data_lib
from flaxvae import defaults, folder, parallel, pipeline, records, train
from flaxvae.datasets import DataError

SHAPE = (6, 5, 3)


def random_images(n, seed=0, shape=SHAPE):
  return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def tiny(data_dir):
  """A 50-example raw dataset `tiny` (plus a test split): (images in example order, Split)."""
  images = {"train": random_images(50), "test": random_images(20, seed=1)}
  builder_dir = records.write_dataset(
      data_dir, "tiny", SHAPE,
      {split: (lambda x=x: ((im, 0) for im in x)) for split, x in images.items()})
  return images, records.Split(builder_dir, "train")


def config_for(data_dir, name, **data):
  config = defaults.base_config()
  config.data.name, config.data.data_dir = name, data_dir
  config.data.update(data)
  return config


def streaming(split, seed=0, batch_size=16, **kwargs):
  return pipeline.StreamingBatches(split, seed, batch_size, read_threads=2, prefetch_batches=4,
                                   **kwargs)


# ----------------------------------------------------------------------------
# Order, sharding, resume
# ----------------------------------------------------------------------------
def test_streaming_gives_the_in_memory_order_across_epochs(tiny):
  images, split = tiny
  stream, batches = data_lib.IndexStream(50, seed=3), streaming(split, seed=3)
  for _ in range(3):  # 3 x 4 batches of 16 = ~4 epochs of 50, crossing epoch boundaries mid-batch
    indices = stream.take(4 * 16).reshape(4, 16)
    assert np.array_equal(batches.take(4), images["train"][indices])
  assert (batches.epoch, batches.position) == (stream.epoch, stream.position)


def test_two_processes_read_disjoint_columns_that_cover_the_epoch(tiny):
  images, split = tiny
  n, batch = 48, 16  # 48 examples would be 3 whole batches; the split has 50, so check ids
  per_process = [streaming(split, seed=5, batch_size=batch, process_index=p, process_count=2)
                 for p in range(2)]
  ids = [[pipeline._LocalBatchIds(50, 5, batch, p * 8, p * 8 + 8)[b] for b in range(3)]
         for p in range(2)]
  ids0, ids1 = np.concatenate(ids[0]), np.concatenate(ids[1])
  assert not set(ids0) & set(ids1)
  assert sorted(np.concatenate([ids0, ids1])) == sorted(data_lib.epoch_permutation(5, 0, 50)[:n])
  global_order = data_lib.IndexStream(50, 5).take(3 * batch).reshape(3, batch)
  for p, batches in enumerate(per_process):
    got = batches.take(3)
    assert got.shape == (3, 8, *SHAPE)
    assert np.array_equal(got, images["train"][global_order[:, p * 8:(p + 1) * 8]])


def test_resume_from_a_checkpoint_gives_the_next_batches(tiny, tmp_path):
  _, split = tiny
  uninterrupted = streaming(split, seed=7).take(9)
  first = streaming(split, seed=7)
  assert np.array_equal(first.take(4), uninterrupted[:4])
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), defaults.base_config().checkpoint)
  checkpointer.save(4, {"x": jnp.zeros(())}, first.state(), {})
  checkpointer.wait()
  _, data_state, _ = checkpointer.restore(4, {"x": jax.ShapeDtypeStruct((), jnp.float32)})
  checkpointer.close()
  assert json.loads(json.dumps(data_state)) == first.state()
  resumed = pipeline.StreamingBatches.from_state(data_state, split, 16, read_threads=1)
  assert np.array_equal(resumed.take(5), uninterrupted[4:])
  # An in-memory run's state resumes the streaming path at the same place, and back.
  stream = data_lib.IndexStream(50, seed=7)
  stream.take(4 * 16)
  crossed = pipeline.StreamingBatches.from_state(stream.state(), split, 16, read_threads=1)
  assert np.array_equal(crossed.take(5), uninterrupted[4:])
  back = data_lib.IndexStream.from_state(first.state())
  assert (back.epoch, back.position) == (stream.epoch, stream.position)


def test_both_feeds_train_identically(tiny, data_dir):
  """The trainer's two dispatch variants (indices vs batches) give the same losses on 8 devices."""
  images, split = tiny
  config = config_for(data_dir, "tiny")
  config.model.hidden, config.model.latent_dim, config.batch_size = (16,), 2, 16
  config.data.binarization = "dynamic"
  losses = {}
  for path in ("in_memory", "streaming"):
    config.data.pipeline = path
    run = train.Run(config)
    assert run.pipeline == path
    data = run.train_images if path == "in_memory" else run.train_split
    feed = pipeline.create_feed(config, run.runner, data)
    fn = run.runner.wrap(functools.partial(feed.step_fn, run.graphdef, run.tx, run.step_cfg, 1),
                         (parallel.REPLICATED, *feed.arg_kinds),
                         (parallel.REPLICATED, parallel.REPLICATED), donate_argnums=(0,))
    state, losses[path] = run.runner.put(run.initial_state()), []
    for _ in range(2):  # 6 batches of 16: past the end of the 50-example epoch
      state, metrics = fn(state, *feed.args(3))
      losses[path].append(float(run.runner.get(metrics)["loss"]))
  np.testing.assert_allclose(losses["in_memory"], losses["streaming"], rtol=1e-6)


def test_auto_picks_streaming_above_the_size_limit(tiny, data_dir):
  assert data_lib.choose_pipeline(config_for(data_dir, "tiny").data, "train") == "in_memory"
  small = config_for(data_dir, "tiny", in_memory_max_bytes=100)
  assert data_lib.choose_pipeline(small.data, "train") == "streaming"
  assert data_lib.choose_pipeline(config_for(data_dir, "cifar10").data, "train") == "in_memory"
  assert data_lib.choose_pipeline(config_for(data_dir, "imagenet32").data, "train") == "streaming"
  with pytest.raises(Exception, match="data.pipeline"):
    data_lib.choose_pipeline(config_for(data_dir, "tiny", pipeline="fast").data, "train")


# ----------------------------------------------------------------------------
# Catalog schema (PNG images, no `index`), read without TensorFlow
# ----------------------------------------------------------------------------
def test_catalog_schema_reads_on_both_paths(tmp_path):
  images = random_images(30, seed=2, shape=(4, 4, 1)) // 255  # binarized_mnist stores 0/1
  records.write_dataset(str(tmp_path), "binarized_mnist", (4, 4, 1),
                        {"train": lambda: ((im, 0) for im in images)}, version="1.0.0",
                        encoding="png")
  config = config_for(str(tmp_path), "binarized_mnist")
  loaded = data_lib.load_images(config.data, "train")
  assert loaded.dtype == np.uint8 and set(np.unique(loaded)) <= {0, 255}
  assert sorted(map(bytes, loaded)) == sorted(map(bytes, images * 255))  # record order, scaled
  split = records.open_split(config.data, "train")
  stream = data_lib.IndexStream(30, seed=0)
  assert np.array_equal(streaming(split, batch_size=8).take(5),
                        loaded[stream.take(40).reshape(5, 8)])


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
  assert np.array_equal(data_lib.load_images(config.data, "train"), expected[~is_test])
  assert np.array_equal(data_lib.load_images(config.data, "test"), expected[is_test])
  assert os.path.isfile(os.path.join(builder_dir, "flaxvae-order-train.npy"))
  with pytest.raises(DataError, match="already exists"):
    folder.prepare_folder(str(source), "pets", 0.25, str(tmp_path / "data"))


def test_folder_grey_images(tmp_path):
  images = random_images(3, shape=(5, 5, 1))
  for i, image in enumerate(images):
    PIL.Image.fromarray(image[..., 0]).save(tmp_path / f"{i}.png")
  folder.prepare_folder(str(tmp_path), "grey", 0.0, str(tmp_path / "data"))
  loaded = data_lib.load_images(config_for(str(tmp_path / "data"), "grey").data, "train")
  assert np.array_equal(loaded, images)


# ----------------------------------------------------------------------------
# Clear failures
# ----------------------------------------------------------------------------
def one_line(e):
  assert "\n" not in str(e.value)
  return str(e.value)


def test_mixed_sizes_name_the_first_offender(tmp_path):
  PIL.Image.fromarray(random_images(1, shape=(5, 5, 3))[0]).save(tmp_path / "a.png")
  PIL.Image.fromarray(random_images(1, shape=(6, 5, 3))[0]).save(tmp_path / "b.png")
  PIL.Image.fromarray(random_images(1, shape=(7, 5, 3))[0]).save(tmp_path / "c.png")
  with pytest.raises(DataError) as e:
    folder.prepare_folder(str(tmp_path), "mixed", 0.0, str(tmp_path / "data"))
  assert str(tmp_path / "b.png") in one_line(e) and "c.png" not in str(e.value)
  assert not os.path.exists(tmp_path / "data" / "mixed")


def test_not_prepared_names_the_command(tmp_path):
  with pytest.raises(DataError) as e:
    records.open_split(config_for(str(tmp_path), "cifar10").data, "train")
  assert "flaxvae prepare-data cifar10" in one_line(e)
  with pytest.raises(DataError) as e:
    records.open_split(config_for(str(tmp_path), "mine").data, "train")
  assert "flaxvae prepare-data folder --source DIR --name mine" in one_line(e)


def test_catalog_preparation_without_tensorflow_says_how(tmp_path):
  try:
    import tensorflow  # noqa: F401
    pytest.skip("TensorFlow is installed: preparing would download")
  except ImportError:
    pass
  with pytest.raises(DataError) as e:
    records.prepare_catalog("cifar10", str(tmp_path))
  assert "pip install 'flaxvae[prep]'" in one_line(e)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_record_file_is_named(tmp_path, damage):
  images = random_images(40, seed=4)
  builder_dir = records.write_dataset(str(tmp_path), "fragile", SHAPE,
                                      {"train": lambda: ((im, 0) for im in images)})
  path = next(os.path.join(builder_dir, f) for f in os.listdir(builder_dir)
              if "train.array_record" in f)
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2] if damage == "truncated" else
            data[:200] + bytes(255 - b for b in data[200:len(data) - 200]) + data[-200:])
  with pytest.raises(DataError) as e:
    split = records.Split(builder_dir, "train")
    split.read_all()
  assert path in one_line(e)


def test_batch_the_shard_cannot_fill_is_refused_with_numbers(tiny, data_dir):
  _, split = tiny
  with pytest.raises(DataError) as e:
    streaming(split, batch_size=64, process_index=0, process_count=2)
  assert all(s in one_line(e) for s in ("64", "32 per process", "50 examples", "25 per process"))
  with pytest.raises(DataError, match="multiple of 2"):
    streaming(split, batch_size=15, process_index=0, process_count=2)
  config = config_for(data_dir, "tiny", pipeline="streaming")
  config.batch_size = 64
  with pytest.raises(DataError, match="64"):
    train.Run(config)
