"""Input pipelines: sharding, one order on both paths, exact resume, choosing a path, errors.

Runs on a tiny raw dataset this file writes itself, so no download and no TensorFlow are needed.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxvae import data as data_lib
from flaxvae import defaults
from flaxvae.data import feeds, order, records
from flaxvae.errors import ConfigError, DataError
from flaxvae.run import Run
from flaxvae.runtime import parallel
from flaxvae.train import checkpoint as checkpoint_lib
from tests.conftest import array_dataset, random_images, tiny_config

SHAPE = (6, 5, 3)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def tiny(data_dir):
  """A 50-example raw dataset `tiny` (plus a test split): (images in example order, Split)."""
  images = {"train": random_images(50, shape=SHAPE), "test": random_images(20, seed=1, shape=SHAPE)}
  builder_dir = records.write_dataset(
    data_dir,
    "tiny",
    SHAPE,
    {split: (lambda x=x: ((im, 0) for im in x)) for split, x in images.items()},
  )
  return images, records.Split(builder_dir, "train")


def config_for(data_dir, name, **data):
  config = defaults.base_config()
  config.data.name, config.data.data_dir = name, data_dir
  config.data.update(data)
  return config


def choose(config, split="train"):
  return data_lib.choose_pipeline(config.data, data_lib.open_dataset(config.data), split)


def streaming(split, seed=0, batch_size=16, **kwargs):
  return feeds.StreamingBatches(
    split, seed, batch_size, read_threads=2, prefetch_batches=4, **kwargs
  )


def one_line(e):
  assert "\n" not in str(e.value)
  return str(e.value)


# ----------------------------------------------------------------------------
# Order, sharding, resume
# ----------------------------------------------------------------------------
def test_streaming_gives_the_in_memory_order_across_epochs(tiny):
  images, split = tiny
  stream, batches = order.IndexStream(50, seed=3), streaming(split, seed=3)
  for _ in range(3):  # 3 x 4 batches of 16 = ~4 epochs of 50, crossing epoch boundaries mid-batch
    indices = stream.take(4 * 16).reshape(4, 16)
    assert np.array_equal(batches.take(4), images["train"][indices])
  assert (batches.epoch, batches.position) == (stream.epoch, stream.position)


def test_two_processes_read_disjoint_columns_that_cover_the_epoch(tiny):
  images, split = tiny
  n, batch = 48, 16  # 48 examples would be 3 whole batches; the split has 50, so check ids
  per_process = [
    streaming(split, seed=5, batch_size=batch, process_index=p, process_count=2) for p in range(2)
  ]
  ids = [
    [feeds._LocalBatchIds(50, 5, batch, p * 8, p * 8 + 8)[b] for b in range(3)] for p in range(2)
  ]
  ids0, ids1 = np.concatenate(ids[0]), np.concatenate(ids[1])
  assert not set(ids0) & set(ids1)
  assert sorted(np.concatenate([ids0, ids1])) == sorted(order.epoch_permutation(5, 0, 50)[:n])
  global_order = order.IndexStream(50, 5).take(3 * batch).reshape(3, batch)
  for p, batches in enumerate(per_process):
    got = batches.take(3)
    assert got.shape == (3, 8, *SHAPE)
    assert np.array_equal(got, images["train"][global_order[:, p * 8 : (p + 1) * 8]])


def test_resume_from_a_checkpoint_gives_the_next_batches(tiny, tmp_path):
  _, split = tiny
  uninterrupted = streaming(split, seed=7).take(9)
  first = streaming(split, seed=7)
  assert np.array_equal(first.take(4), uninterrupted[:4])
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), defaults.base_config().checkpoint)
  checkpointer.start_writing()
  checkpointer.save(4, {"x": jnp.zeros(())}, first.state(), {})
  checkpointer.wait()
  _, data_state, _ = checkpointer.restore(4, {"x": jax.ShapeDtypeStruct((), jnp.float32)})
  checkpointer.close()
  assert json.loads(json.dumps(data_state)) == first.state()
  resumed = feeds.StreamingBatches.from_state(data_state, split, 16, read_threads=1)
  assert np.array_equal(resumed.take(5), uninterrupted[4:])
  # An in-memory run's state resumes the streaming path at the same place, and back.
  stream = order.IndexStream(50, seed=7)
  stream.take(4 * 16)
  crossed = feeds.StreamingBatches.from_state(stream.state(), split, 16, read_threads=1)
  assert np.array_equal(crossed.take(5), uninterrupted[4:])
  back = order.IndexStream.from_state(first.state())
  assert (back.epoch, back.position) == (stream.epoch, stream.position)


def test_resume_refuses_another_split_or_batch_size(tiny):
  _, split = tiny
  first = streaming(split, seed=7)
  first.take(1)
  with pytest.raises(DataError, match="whole number of batches of 24"):
    feeds.StreamingBatches.from_state(first.state(), split, 24, read_threads=1)
  with pytest.raises(DataError, match="49 examples.*this one has 50"):
    feeds.StreamingBatches.from_state(
      dict(first.state(), num_examples=49), split, 16, read_threads=1
    )


def test_both_feeds_train_identically(tiny, data_dir):
  """The trainer's two dispatch variants (indices vs batches) give the same losses on 8 devices."""
  config = tiny_config("mlp")
  config.data.name, config.data.data_dir = "tiny", data_dir
  assert config.batch_size == 16 and config.data.protocol == "binarized"  # dynamic binarization
  assert jax.device_count() == 8
  losses = {}
  for path in ("in_memory", "streaming"):
    config.data.pipeline = path
    run = Run(config)
    assert run.pipeline == path
    feed = run.create_feed()
    assert feed.gathers == (path == "in_memory")
    fn = run.train_fn("indices" if feed.gathers else "batches")
    state, losses[path] = run.runner.put(run.initial_state()), []
    for _ in range(2):  # 6 batches of 16: past the end of the 50-example epoch
      state, metrics = fn(state, *feed.args(3))
      losses[path].append(float(run.runner.get(metrics)["loss"]))
    assert feed.state()["epoch"] == 1 and feed.state()["position"] == 6 * 16 - 50
  np.testing.assert_allclose(losses["in_memory"], losses["streaming"], rtol=1e-6)


def test_create_feed_resumes_either_path(tiny):
  """create_feed with a checkpoint's data state continues the same order on either path."""
  images, split = tiny
  runner = parallel.create_runner(defaults.base_config().parallel, 16)
  uninterrupted = order.IndexStream(50, seed=3).take(5 * 16).reshape(5, 16)
  memory = feeds.create_feed(images["train"], runner, seed=3, batch_size=16)
  assert memory.gathers
  np.testing.assert_array_equal(np.asarray(memory.args(2)[1]), uninterrupted[:2])  # 1 process
  stream = feeds.create_feed(
    split,
    runner,
    seed=3,
    batch_size=16,
    read_threads=1,
    prefetch_batches=2,
    data_state=memory.state(),
  )
  assert not stream.gathers
  (batches,) = stream.args(2)
  np.testing.assert_array_equal(np.asarray(batches), images["train"][uninterrupted[2:4]])
  back = feeds.create_feed(
    images["train"], runner, seed=0, batch_size=16, data_state=stream.state()
  )
  np.testing.assert_array_equal(np.asarray(back.args(1)[1]), uninterrupted[4:5])


def test_auto_picks_streaming_above_the_size_limit(tiny, data_dir):
  assert choose(config_for(data_dir, "tiny")) == "in_memory"
  assert choose(config_for(data_dir, "tiny", in_memory_max_bytes=100)) == "streaming"
  assert choose(config_for(data_dir, "cifar10")) == "in_memory"
  assert choose(config_for(data_dir, "imagenet32")) == "streaming"
  assert choose(config_for(data_dir, "tiny", pipeline="streaming")) == "streaming"
  # Arrays already in memory stay there, whatever their size.
  small = config_for(data_dir, "tiny", in_memory_max_bytes=100)
  assert data_lib.choose_pipeline(small.data, array_dataset(50, 8, SHAPE), "train") == "in_memory"
  with pytest.raises(ConfigError, match="data.pipeline"):
    choose(config_for(data_dir, "tiny", pipeline="fast"))


# ----------------------------------------------------------------------------
# Clear failures
# ----------------------------------------------------------------------------
def test_batch_the_shard_cannot_fill_is_refused_with_numbers(tiny, data_dir):
  _, split = tiny
  with pytest.raises(DataError) as e:
    streaming(split, batch_size=64, process_index=0, process_count=2)
  assert all(s in one_line(e) for s in ("64", "32 per process", "50 examples", "25 per process"))
  with pytest.raises(DataError, match="multiple of 2"):
    streaming(split, batch_size=15, process_index=0, process_count=2)
  with pytest.raises(DataError, match="multiple of 2"):
    feeds.check_batch_size(15, 50, 2)
  assert feeds.check_batch_size(16, 50, 2) == 8
  config = config_for(data_dir, "tiny", pipeline="streaming")
  config.batch_size = 64
  with pytest.raises(DataError, match="64"):
    Run(config)


def test_arrays_in_memory_cannot_stream():
  with pytest.raises(DataError, match="data.pipeline=in_memory"):
    array_dataset(8, 8, SHAPE).open_split("train")
