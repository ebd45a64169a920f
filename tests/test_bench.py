"""The bench runs end to end on a tiny model; dispatch sizes stay two; bf16 compute keeps f32 state.

No timing assertions here: throughput goals live in `make bench` (BENCHMARKS.md).
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxvae import bench, cli, defaults, train
from flaxvae import data as data_lib
from flaxvae import step as step_lib


def tiny_config(**changes):
  config = defaults.base_config()
  config.model.hidden = (32,)
  config.model.latent_dim = 4
  config.batch_size = 16
  config.steps_per_dispatch = 2
  config.update(changes)
  return config


@pytest.fixture(scope="module")
def images():
  return np.random.default_rng(0).integers(0, 256, (128, 28, 28, 1), dtype=np.uint8)


@pytest.fixture(autouse=True)
def fake_data(monkeypatch, images):
  monkeypatch.setattr(data_lib, "load_images", lambda data_config, split: images)


def test_bench_cases_emit_one_json_line_each(images):
  lines = []
  rows = bench.run_cases(tiny_config(), ("default", "dispatch", "scaling"), steps=2, windows=1,
                         device_counts=(1, 8), emit=lines.append)
  assert [json.loads(line) for line in lines] == rows
  assert [r["case"] for r in rows] == ["default", "dispatch", "dispatch", "scaling", "scaling"]
  for row in rows:
    assert row["examples_per_s"] > 0 and row["flops_per_example"] > 0 and 0 < row["mfu"]
    assert row["compile_s"] >= 0 and row["device_kind"] and row["jax"] == jax.__version__
  eight = rows[-1]
  assert eight["num_devices"] == 8 and eight["allreduce_bytes"] > 0
  # Same seed and global batch: the 8-device run computes the 1-device run's numbers.
  assert eight["loss"] == pytest.approx(rows[-2]["loss"], rel=1e-4)


def test_bench_rejects_unknown_case(capsys):
  status = cli.main(["flaxvae", "bench", "--config", "configs/fashion_mnist_mlp.py",
                     "--cases", "default,fastest"])
  assert status == cli.USAGE_ERROR
  assert "unknown --cases" in capsys.readouterr().err


def test_dispatches_use_two_sizes_only():
  config = tiny_config(num_steps=23, steps_per_dispatch=4, log_every_steps=10)
  config.eval.every_steps = 0
  config.checkpoint.every_steps = 7
  step, sizes = 0, []
  while step < config.num_steps:
    n = train.next_dispatch_size(step, config)
    sizes.append(n)
    step += n
    for every in (10, 7):  # no dispatch runs past an event
      assert (step - n) // every == step // every or step % every == 0
  assert step == 23 and set(sizes) == {4, 1}


def test_recompilation_guard():
  f = jax.jit(lambda x: x + 1)
  f(jnp.ones(2))
  train.check_no_recompilation(f, {2})
  f(jnp.ones(3))
  with pytest.raises(RuntimeError, match="compiled 2 times"):
    train.check_no_recompilation(f, {2})


def test_bfloat16_compute_keeps_float32_state_and_close_loss(images):
  losses = {}
  for dtype in ("float32", "bfloat16"):
    run = train.Run(tiny_config(dtype=dtype))
    state = run.initial_state()
    step = jax.jit(jax.shard_map(
        lambda s, x: step_lib.train_step(run.graphdef, run.tx, run.step_cfg, s, x),
        mesh=jax.sharding.Mesh(np.asarray(jax.devices()[:1]), (step_lib.AXIS,)),
        in_specs=(jax.P(), jax.P()), out_specs=(jax.P(), jax.P()), check_vma=False))
    state, metrics = step(state, jnp.asarray(images[:16]))
    for leaf in jax.tree.leaves((state.params, state.opt_state)):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        assert leaf.dtype == jnp.float32
    assert metrics["loss"].dtype == jnp.float32
    losses[dtype] = float(metrics["loss"])
  assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=2e-2)
