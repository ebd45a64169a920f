"""train() itself on 8 devices, with both backends, single- and multi-step dispatches, the MLP
and the conv model, at the default log interval (the host reads nothing until the end, so
dozens of dispatches would queue without the trainer's bound): the same run as on 1 device."""

import pathlib

import jax
import numpy as np
import pytest

from flaxvae.errors import ConfigError
from flaxvae.runtime import parallel
from flaxvae.train import checkpoint as checkpoint_lib
from flaxvae.train.trainer import train
from tests.conftest import array_dataset, tiny_config

STEPS = 40  # one-step dispatches: 40 queued without a bound (8 devices deadlocked at ~32)


def final_params(workdir):
  steps = sorted(
    int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit()
  )
  return checkpoint_lib.read_state(
    pathlib.Path(workdir) / "checkpoints" / str(steps[-1]) / "state"
  )["params"]


def config(model, steps_per_dispatch, **changes):
  return tiny_config(
    model,
    num_steps=STEPS,
    steps_per_dispatch=steps_per_dispatch,
    scan_unroll=steps_per_dispatch if model == "conv" else 1,
    log_every_steps=1000,
    **{"checkpoint.every_steps": 0},
    **changes,
  )


# mlp-1 is the deadlock's case (one-step dispatches); conv-4 trains the conv model on 8 devices;
# the other two add little for their cost, so `make test-slow` runs them.
SLOW = pytest.mark.slow


@pytest.mark.parametrize(
  "model, steps_per_dispatch",
  [
    ("mlp", 1),
    pytest.param("mlp", 8, marks=SLOW),
    pytest.param("conv", 1, marks=SLOW),
    ("conv", 4),
  ],
)
def test_eight_devices_and_both_backends_train_as_one(
  tmp_path, compilation_cache, model, steps_per_dispatch
):
  assert jax.device_count() == 8
  dataset = array_dataset(train=128, test=32)
  one = train(
    config(model, steps_per_dispatch, **{"parallel.num_devices": 1}), str(tmp_path / "one"), dataset
  )
  reference = final_params(tmp_path / "one")
  for backend in ("shard_map", "pmap"):
    row = train(
      config(model, steps_per_dispatch, **{"parallel.backend": backend}),
      str(tmp_path / backend),
      dataset,
    )
    np.testing.assert_allclose(row["elbo"], one["elbo"], rtol=1e-4)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
      final_params(tmp_path / backend),
      reference,
    )


@pytest.mark.parametrize(
  "model, changes",
  [
    ("mlp", {"objective.name": "iwae", "objective.num_samples": 3}),
    pytest.param("mlp", {"objective.free_bits": 0.1, "objective.num_samples": 2}, marks=SLOW),
    ("ladder_mlp", {}),
    ("mlp", {"model.posterior": "iaf", "model.iaf_steps": 2}),
  ],
)
def test_objectives_and_models_do_not_depend_on_the_device_count(
  tmp_path, compilation_cache, model, changes
):
  """The objectives, a hierarchical model and a flow posterior: 8 devices train as 1."""
  dataset = array_dataset(train=128, test=32)
  one = train(
    config(model, 4, **{"parallel.num_devices": 1}, **changes), str(tmp_path / "1"), dataset
  )
  eight = train(config(model, 4, **changes), str(tmp_path / "8"), dataset)
  np.testing.assert_allclose(eight["elbo"], one["elbo"], rtol=1e-4)
  np.testing.assert_allclose(eight["rate_by_layer"], one["rate_by_layer"], rtol=1e-4, atol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
    final_params(tmp_path / "8"),
    final_params(tmp_path / "1"),
  )


def test_batch_must_divide_over_devices():
  c = tiny_config(batch_size=12)
  with pytest.raises(ConfigError, match="does not divide evenly over 8 devices"):
    parallel.create_runner(c.parallel, c.batch_size)


def test_inference_runs_on_any_device_count():
  c = tiny_config(batch_size=12, **{"parallel.num_devices": 64})
  runner = parallel.inference_runner(c.parallel)
  assert runner.num_devices == 8
