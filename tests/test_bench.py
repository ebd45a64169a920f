"""`flaxvae bench` on a tiny model, through the trainer's own train function: the throughput
row of a user's config, the ahead-of-time memory report, the one timing loop; bf16 compute
keeps f32 state.

No timing assertions here: throughput figures live in `make bench` (BENCHMARKS.md), whose
scripts have their tests in benchmarks/tests (`make test-bench`).
"""

import json

import jax
import jax.numpy as jnp
import pytest

from flaxvae import bench, cli
from flaxvae.errors import UsageError
from flaxvae.run import Run
from flaxvae.runtime import parallel, timing
from flaxvae.train import trainer
from tests import conftest
from tests.conftest import REPO, array_dataset, tiny_config


def bench_config(**changes):
  return tiny_config(
    **{"model.hidden": (32,), "model.latent_dim": 4, "steps_per_dispatch": 2, **changes}
  )


def test_throughput_is_one_row_of_the_users_config_on_one_device():
  row = bench.throughput(bench_config(), steps=2, windows=2, dataset=array_dataset(64, 16))
  assert row["case"] == "default" and row["num_devices"] == 1 and row["batch_size"] == 16
  assert row["examples_per_s"] > 0 and row["flops_per_example"] > 0 and row["mfu"] > 0
  assert row["steps_per_window"] == 2 and len(row["window_examples_per_s"]) == 2
  assert row["device_kind"] and row["jax"] == jax.__version__
  assert "cpu" not in row  # machine probing is the benchmark lab's (benchmarks/machine.py)


def test_flaxvae_bench_prints_one_json_line_for_the_config(capfd, tiny_data_dir):
  status = cli.main(
    [
      "flaxvae",
      "bench",
      f"--config={REPO / 'configs' / 'fashion_mnist_mlp.py'}",
      "--config.data.name=tiny",
      f"--config.data.data_dir={tiny_data_dir}",
      "--config.batch_size=8",
      "--config.steps_per_dispatch=2",
      "--config.model.hidden=(16,)",
      "--steps=2",
      "--windows=1",
    ]
  )
  lines = capfd.readouterr().out.strip().splitlines()
  assert status == 0 and len(lines) == 1
  row = json.loads(lines[0])
  assert row["model"] == "mlp" and row["examples_per_s"] > 0 and row["steps_per_window"] == 2


def test_the_timing_loop_warms_up_then_times_windows_waiting_on_each_last_result():
  calls, waited = [], []
  measured = timing.time_calls(
    lambda: calls.append(1) or len(calls),
    wait=waited.append,
    warmup=2,
    windows=3,
    calls_per_window=4,
  )
  assert len(calls) == 2 + 3 * 4 and waited == [1, 2, 6, 10, 14]
  assert len(measured.window_s) == 3 and measured.calls_per_window == 4
  assert measured.rates(10) == [40 / s for s in measured.window_s]
  assert measured.best_rate() == max(measured.rates())
  # Without a count, a window holds as many calls as fit its seconds at the warm-up's pace.
  assert timing.time_calls(lambda: None, window_seconds=60.0).calls_per_window > 1
  assert timing.time_calls(lambda: None, windows=0).window_s == ()


def test_recompilation_guard():
  f = jax.jit(lambda x: x + 1)
  f(jnp.ones(2))
  trainer.check_no_recompilation(f, {(id(f), 2)})  # (program, dispatch size) pairs run
  f(jnp.ones(3))
  with pytest.raises(RuntimeError, match=r"compiled 2 times for dispatch sizes \[2\]"):
    trainer.check_no_recompilation(f, {(id(f), 2)})


def test_bfloat16_compute_keeps_float32_state_and_close_loss():
  dataset, losses = array_dataset(32, 16), {}
  for dtype in ("float32", "bfloat16"):
    run = Run(bench_config(dtype=dtype), dataset)
    runner = parallel.Runner("shard_map", jax.devices()[:1])
    step = run.train_fn("one_step", runner=runner)
    state, metrics = step(
      runner.put(run.initial_state(), "state"),
      runner.put(run.train_images[:16], parallel.batch_axis(0)),
    )
    for leaf in jax.tree.leaves((state.params, state.opt_state)):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        assert leaf.dtype == jnp.float32
    assert metrics["loss"].dtype == jnp.float32
    losses[dtype] = float(metrics["loss"])
  assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=2e-2)


@pytest.mark.slow  # several compiles for 8 devices: `make test-slow` runs it
def test_aot_reports_memory_split_over_fsdp_and_the_largest_batch():
  """`bench --aot`: from shapes alone, per-device parameter and optimizer bytes fall as
  1/fsdp (a 784x256 kernel splits 8 ways), and the batch that fits a memory is a multiple of
  the device count."""
  config = bench_config(**{"model.hidden": (256,), "steps_per_dispatch": 1})
  whole, split = (
    bench.aot_row(config, 8, image_shape=(28, 28, 1), mesh=mesh, device_memory=2**30)
    for mesh in ("", "fsdp:8")
  )
  assert whole["parameters"] == split["parameters"] > 2 * 784 * 256
  # FLOPs of one step per example, whatever the mesh: at least the first layer's forward,
  # its two backward matmuls and the decoder's mirror of them.
  assert whole["flops_per_example"] == split["flops_per_example"] > 4 * 2 * 784 * 256
  assert split["mesh"] == "fsdp:8" and whole["mesh"] == "data"
  for key in ("per_device_parameter_gib", "per_device_optimizer_gib"):
    assert split[key] < whole[key] / 6  # 1/8, less the small arrays kept whole
  for row in (whole, split):
    assert row["largest_batch"] > 0 and row["largest_batch"] % 8 == 0
    assert row["per_device_temp_gib"] >= 0 and row["compile_s"] >= 0


def test_aot_on_one_device_reports_parameters_flops_and_memory_from_shapes_alone():
  row = bench.aot_row(bench_config(), 1, image_shape=(28, 28, 1), device_memory=2**30)
  assert row["case"] == "aot" and row["parameters"] > 2 * 784 * 32
  assert row["flops_per_example"] > 4 * 2 * 784 * 32 and row["per_device_temp_gib"] >= 0
  assert row["largest_batch"] > 0


def test_aot_image_shape_is_one_side_or_three_dimensions():
  assert bench.parse_image_shape("512") == (512, 512, 3)
  assert bench.parse_image_shape("64,32") == (64, 32, 3)
  assert bench.parse_image_shape("28,28,1") == (28, 28, 1)
  for bad in ("", "a", "1,2,3,4", "0"):
    with pytest.raises(UsageError, match="--image_shape"):
      bench.parse_image_shape(bad)


@pytest.mark.slow  # two compiles of both players (LPIPS's VGG16 included) for 8 devices
def test_aot_of_two_players_reports_the_discriminators_parameters_and_memory():
  """The latent autoencoder's step, both players and LPIPS's weights as shapes alone: the
  discriminator's parameters and state are reported beside the autoencoder's."""
  config = conftest.load_config("fashion_mnist_kl_f4", "tiny")
  row = bench.aot_row(config, 8, image_shape=(28, 28, 1), mesh="data:2,fsdp:4", device_memory=2**30)
  assert row["parameters"] > row["adversary_parameters"] > 0
  for key in ("parameter", "optimizer", "stats"):
    assert row[f"per_device_adversary_{key}_gib"] >= 0
  assert row["flops_per_example"] > 0 and row["largest_batch_per_device"] > 0
