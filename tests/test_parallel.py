"""One device, eight with shard_map, eight with pmap: the same seed and global batch give the same run."""
import functools

import jax
import numpy as np
import pytest

from flaxvae import data as data_lib
from flaxvae import defaults, parallel, train
from flaxvae import step as step_lib
from flaxvae.models import ConfigError


def tiny_images(n=256, seed=0, shape=(28, 28, 1)):
  return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


@pytest.fixture
def fake_data(monkeypatch):
  splits = {"train": tiny_images(), "test": tiny_images(64, seed=1)}
  monkeypatch.setattr(data_lib, "load_images", lambda data_config, split: splits[split])
  return splits


def small_config(backend="shard_map", num_devices=0, binarization="dynamic", **objective):
  config = defaults.base_config()
  config.model.hidden = (32,)
  config.model.latent_dim = 4
  config.batch_size = 16
  config.data.binarization = binarization
  config.parallel.backend = backend
  config.parallel.num_devices = num_devices
  config.objective.update(objective)
  return config


def run_steps(config, dispatches=2, steps_per_dispatch=3):
  """Trains for a few dispatches the way train.py does; returns per-dispatch losses and params."""
  run = train.Run(config)
  runner = run.runner
  fn = runner.wrap(functools.partial(step_lib.gather_train_steps, run.graphdef, run.tx,
                                     run.step_cfg, 1),
                   (parallel.REPLICATED, parallel.REPLICATED, parallel.batch_axis(1)),
                   (parallel.REPLICATED, parallel.REPLICATED), donate_argnums=(0,))
  state = runner.put(run.initial_state())
  dataset = runner.put(run.train_images)
  stream = data_lib.IndexStream(len(run.train_images), config.seed)
  losses = []
  for _ in range(dispatches):
    idx = stream.take(steps_per_dispatch * config.batch_size).reshape(steps_per_dispatch, -1)
    state, metrics = fn(state, dataset, runner.put(idx, parallel.batch_axis(1)))
    losses.append(float(runner.get(metrics)["loss"]))
  return losses, runner.get(state.params)


@pytest.mark.parametrize("objective", [dict(), dict(name="iwae", num_samples=3),
                                       dict(free_bits=0.1, num_samples=2)])
def test_one_and_eight_devices_and_both_backends_agree(fake_data, objective):
  assert jax.device_count() == 8
  reference_losses, reference_params = run_steps(small_config(num_devices=1, **objective))
  for backend in ("shard_map", "pmap"):
    losses, params = run_steps(small_config(backend, **objective))
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 params, reference_params)


def test_training_lowers_the_loss(fake_data):
  losses, _ = run_steps(small_config(binarization="static"), dispatches=4, steps_per_dispatch=10)
  assert losses[-1] < losses[0]


def test_batch_must_divide_over_devices():
  config = small_config()
  config.batch_size = 12
  with pytest.raises(ConfigError, match="does not divide evenly over 8 devices"):
    parallel.create_runner(config.parallel, config.batch_size)


def test_index_stream_runs_across_epochs_and_resumes():
  stream = data_lib.IndexStream(10, seed=3)
  first = stream.take(7)
  resumed = data_lib.IndexStream.from_state(stream.state())
  rest_a, rest_b = stream.take(25), resumed.take(25)
  np.testing.assert_array_equal(rest_a, rest_b)
  epoch0 = data_lib.epoch_permutation(3, 0, 10)
  np.testing.assert_array_equal(np.concatenate([first, rest_a[:3]]), epoch0)
  assert sorted(rest_a[3:13]) == list(range(10))
