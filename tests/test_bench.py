"""The bench runs end to end on a tiny model, through the trainer's own train function; bf16
compute keeps f32 state.

No timing assertions here: throughput goals live in `make bench` (BENCHMARKS.md).
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from flaxvae import bench, cli
from flaxvae.errors import UsageError
from flaxvae.run import Run
from flaxvae.runtime import parallel
from flaxvae.train import trainer
from tests.conftest import REPO, array_dataset, load_config, tiny_config


def bench_config(**changes):
  return tiny_config(**{"model.hidden": (32,), "model.latent_dim": 4, "steps_per_dispatch": 2,
                        **changes})


@pytest.mark.slow  # `make bench`'s own path: `make test-slow` runs it
def test_bench_cases_emit_one_json_line_each():
  lines = []
  rows = bench.run_cases(bench_config(), ("default", "dispatch", "scaling"), steps=2, windows=1,
                         device_counts=(1, 8), dataset=array_dataset(128, 16), emit=lines.append)
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
  assert status == UsageError.exit_status
  assert "unknown --cases" in capsys.readouterr().err


def test_recompilation_guard():
  f = jax.jit(lambda x: x + 1)
  f(jnp.ones(2))
  trainer.check_no_recompilation(f, {2})
  f(jnp.ones(3))
  with pytest.raises(RuntimeError, match="compiled 2 times"):
    trainer.check_no_recompilation(f, {2})


def test_bfloat16_compute_keeps_float32_state_and_close_loss():
  dataset, losses = array_dataset(32, 16), {}
  for dtype in ("float32", "bfloat16"):
    run = Run(bench_config(dtype=dtype), dataset)
    runner = parallel.Runner("shard_map", jax.devices()[:1])
    step = run.train_fn("one_step", runner=runner)
    state, metrics = step(runner.put(run.initial_state(), "state"),
                          runner.put(run.train_images[:16], parallel.batch_axis(0)))
    for leaf in jax.tree.leaves((state.params, state.opt_state)):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        assert leaf.dtype == jnp.float32
    assert metrics["loss"].dtype == jnp.float32
    losses[dtype] = float(metrics["loss"])
  assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=2e-2)


def load_report():
  """benchmarks/report.py, which is a script, not part of the package."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("report", REPO / "benchmarks" / "report.py")
  report = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(report)
  return report


def test_the_anchor_comparison_renders_from_its_record_with_each_side_at_its_best_round():
  """The comparison with Efficient-VDVAE's own code is a committed record (that code is run by
  hand, never committed); the report credits each side with its best round."""
  report = load_report()
  with open(REPO / report.ANCHOR_RECORD) as f:
    rec = json.load(f)
  line = report.anchor_line()
  ratio = min(rec["seconds_per_step"]["anchor"]) / min(rec["seconds_per_step"]["flaxvae"])
  assert f"**{ratio:.2f}x**" in line and rec["measured"] in line and "protocol" in rec


def test_make_bench_measures_each_command_once_and_resumes_from_its_cache(tmp_path):
  """benchmarks/report.py's cache: a stopped `make bench` resumes, parts measured apart."""
  report = load_report()
  path, calls = str(tmp_path / "cache.jsonl"), []
  measure = lambda: calls.append(1) or {"examples_per_s": 5.0}
  assert report.Cache(path).get("a #round0", measure) == {"examples_per_s": 5.0}
  assert report.Cache(path).get("a #round0", measure) == {"examples_per_s": 5.0}
  assert len(calls) == 1  # the second sitting read it back
  report.Cache(path, fresh=True).get("a #round0", measure)
  assert len(calls) == 2 and (tmp_path / "cache.jsonl.old").exists()  # --fresh keeps the old
  report.Cache(path, code="new code").get("a #round0", measure)
  assert len(calls) == 3  # measured by other code: stale, so measured again
  report.Cache(path, code="new code").get("a #round0", measure)
  assert len(calls) == 3


def test_a_partial_aot_measurement_replaces_its_rows_and_keeps_the_earlier_reports_others():
  """`--parts aot --aot_configs cifar10_vdvae --aot_devices 1` must not drop the 64-device
  rows that took hours: rows merge by what they measure, older rows named by image shape."""
  report = load_report()
  def row(devices, mesh="data", compile_s=1.0, **extra):
    return dict(model="vdvae", num_devices=devices, mesh=mesh, remat=False, batch_size=32,
                image_shape=[64, 64, 3], compile_s=compile_s, **extra)
  earlier = [row(8), row(64, "data:8,fsdp:8")]  # from before rows carried their config
  new = [row(1, config="cifar10_vdvae"), row(8, compile_s=2.0, config="imagenet64_vdvae")]
  merged = report.merge_aot(new, earlier)
  assert [(report.aot_identity(r)[:2], r["compile_s"]) for r in merged] == [
      (("cifar10_vdvae", 1), 1.0), (("imagenet64_vdvae", 8), 2.0),
      (("imagenet64_vdvae", 64), 1.0)]
  assert {p[0] for p in report.aot_plan()} == set(report.AOT_CONFIGS)
  assert all({(name, 1, ()), (name, 8, ())} <= {(n, d, tuple(f)) for n, d, f in report.aot_plan()}
             for name in report.AOT_CONFIGS)  # every config on 1 and 8 devices


def test_the_code_fingerprint_changes_with_the_package_and_not_with_the_docs(tmp_path):
  report = load_report()
  (tmp_path / "flaxvae").mkdir()
  (tmp_path / "flaxvae" / "step.py").write_text("x = 1\n")
  before = report.code_fingerprint(str(tmp_path))
  (tmp_path / "README.md").write_text("figures\n")
  assert report.code_fingerprint(str(tmp_path)) == before
  (tmp_path / "flaxvae" / "step.py").write_text("x = 2\n")
  assert report.code_fingerprint(str(tmp_path)) != before


@pytest.mark.slow  # `make bench`'s own path: `make test-slow` runs it
def test_aot_reports_memory_split_over_fsdp_and_the_largest_batch():
  """`bench --aot`: from shapes alone, per-device parameter and optimizer bytes fall as
  1/fsdp (a 784x256 kernel splits 8 ways), and the batch that fits a memory is a multiple of
  the device count."""
  config = bench_config(**{"model.hidden": (256,), "steps_per_dispatch": 1})
  whole, split = (bench.aot_row(config, 8, image_shape=(28, 28, 1), mesh=mesh,
                                device_memory=2**30) for mesh in ("", "fsdp:8"))
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


@pytest.mark.slow  # `make bench`'s own path: `make test-slow` runs it
def test_eval_case_times_the_importance_pass_against_its_flop_limit():
  config = bench_config(**{"eval.final_num_importance_samples": 8, "eval.ais_steps": 2,
                           "eval.ais_chains": 1, "eval.ais_leapfrog": 1})
  row = bench.eval_row(config, array_dataset(32, 16), num_examples=16, ais_examples=8)
  assert row["case"] == "eval" and row["num_examples"] == 16
  assert row["num_importance_samples"] == 8 and row["flops"] > 0
  for key in ("seconds", "flop_limit_seconds", "ais_seconds_per_1000", "iwae_seconds_per_1000"):
    assert row[key] >= 0  # rounded to 0.1 s: a tiny model's pass may round to 0


def test_self_times_take_nested_thunks_out_of_their_loop():
  # A while loop (0-100 ns) runs two fusions inside it; a convolution follows on the thread.
  events = [("fusion.2", 60, 30), ("while", 0, 100), ("fusion.1", 10, 40), ("convolution", 100, 5)]
  assert sorted(bench.self_times(events)) == [("convolution", 5), ("fusion.1", 40),
                                              ("fusion.2", 30), ("while", 30)]
  assert [bench.op_kind(n) for n in ("convolution.3", "conv_general_dilated.12", "ynn_fusion.4",
                                     "dot.7", "transpose_copy_fusion.9", "copy.2", "while.1",
                                     "add_maximum_fusion.3", "wrapped_log-plus-one", "rng")] == [
      "convolution", "convolution", "dot", "dot", "layout transpose or copy",
      "layout transpose or copy", "control flow", "elementwise fusion", "elementwise fusion",
      "other"]


@pytest.mark.slow  # `make bench`'s own path: `make test-slow` runs it
def test_profile_case_traces_the_trainers_step_in_a_child_with_thunk_tracing(
    tmp_path, capfd, tiny_data_dir):
  status = cli.main(["flaxvae", "bench", f"--config={REPO / 'configs' / 'fashion_mnist_mlp.py'}",
                     "--cases", "profile", "--config.data.name=tiny",
                     f"--config.data.data_dir={tiny_data_dir}", "--config.batch_size=8",
                     "--config.steps_per_dispatch=2", "--config.model.hidden=(16,)"])
  out = capfd.readouterr().out
  assert status in (0, None), out
  row = json.loads(out.strip().splitlines()[-1])
  assert row["case"] == "profile" and row["steps"] == 6 and row["threads"] >= 1
  assert set(row["ms_per_step_by_kind"]) == {*bench.OP_KINDS, bench.WAITING}
  assert row["busy_ms_per_step"] + row["convolution_wait_ms_per_step"] <= (
      sum(row["ms_per_step_by_kind"].values()) + 0.01)
  assert sum(row["share_by_kind"].values()) == pytest.approx(1.0, abs=1e-3)
  assert row["heaviest"] and all(h["ms_per_step"] >= 0 and h["shape"] for h in row["heaviest"])


@pytest.mark.slow
def test_depth_case_compiles_each_depth_with_and_without_scan_and_remat():
  config = load_config("fashion_mnist_vdvae", "tiny")
  rows = bench.depth_rows(config, depths=(1, 2), emit=lambda line: None)
  assert [(r["depth"], r["scan_blocks"], r["remat"]) for r in rows] == [
      (d, s, m) for d in (1, 2) for s in ("unroll", "scan") for m in (False, True)]
  assert all(r["compile_s"] > 0 and r["parameters"] > 0 for r in rows)
  by = {(r["depth"], r["scan_blocks"], r["remat"]): r["parameters"] for r in rows}
  assert by[(2, "scan", False)] == by[(2, "unroll", True)] > by[(1, "scan", False)]


def test_results_rows_survive_their_run_dirs(tmp_path, monkeypatch):
  """benchmarks/results.py: a finished row's figures go into its record in git, so RESULTS.md
  is written the same on a fresh checkout, where runs/ is gone."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("results", REPO / "benchmarks" / "results.py")
  results = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(results)
  monkeypatch.setattr(results, "RUNS", str(tmp_path / "runs"))
  monkeypatch.setattr(results, "RECORDS", str(tmp_path / "records"))
  run_dir = tmp_path / "runs" / "quality" / "conv_8bit"
  run_dir.mkdir(parents=True)
  final = {"step": 40, "log_px": -900.0, "nll": 900.0, "bits_per_dim": 1.6, "elbo": -910.0,
           "active_units_by_layer": [7]}
  (run_dir / "eval.json").write_text(json.dumps(final))
  (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
      {"split": "train", "step": 20, "wall_s": 60.0},
      {"split": "test", "step": 20, "log_px": -950.0, "bits_per_dim": 1.7})))
  written = results.quality_table()
  assert "| conv | 8bit | 40 | 900.00 | 1.6000 |" in written
  shutil.rmtree(tmp_path / "runs")
  assert results.quality_table() == written  # read back from the record
  curve = results.record("quality", "conv_8bit")["periodic"]
  assert curve == [{"split": "test", "step": 20, "log_px": -950.0, "bits_per_dim": 1.7,
                    "wall_minutes": 1.0}]


def test_make_bench_keeps_the_sections_it_did_not_measure(tmp_path, monkeypatch):
  """BENCHMARKS.md is the record (runs/, where the cache lives, is gone on a fresh machine):
  `--parts depth` replaces the depth section and keeps every other part with its raw rows."""
  import sys
  report = load_report()
  out = tmp_path / "BENCHMARKS.md"
  out.write_text("\n".join([
      "# Benchmarks", "", "old header", "", "## VDVAE (x) against its PyTorch twin", "",
      "_Measured 2026-12-02 10:00, by this report._", "", "| a | b |", "",
      "## Depth: old", "", "old depth table", "", "## Raw results", "", "### vdvae", "",
      "```json", '{"model": "vdvae", "examples_per_s": 5}', "```", "", "### depth", "",
      "```json", '{"depth": 1}', "```", ""]))
  depth_rows = [{"depth": 4, "scan_blocks": "scan", "remat": True, "compile_s": 1.0}]
  monkeypatch.setattr(report, "json_lines", lambda cmd, **kw: depth_rows)
  monkeypatch.setattr(sys, "argv", ["report.py", "--out", str(out), "--parts", "depth",
                                    "--cache", str(tmp_path / "cache.jsonl")])
  report.main()
  text = out.read_text()
  assert "| a | b |" in text and "_Measured 2026-12-02 10:00, by an earlier report._" in text
  assert "old depth table" not in text and "| 4 | scan | True | 1.0 |" in text
  assert report.earlier_report(str(out))["vdvae"][1] == [{"model": "vdvae", "examples_per_s": 5}]
  assert report.earlier_report(str(out))["depth"][1] == depth_rows
  assert "Kept from an earlier report: vdvae." in text


def test_waits_after_an_asynchronous_op_count_to_it_until_a_long_wait_ends():
  us = 1_000
  events = [("conv", 0, 1 * us), ("fusion", 1 * us, 2 * us),  # the conv goes on after its event
            ("next", 500 * us, 501 * us),  # a long wait: the conv's completion
            ("other", 503 * us, 504 * us),  # a short hand-off, no conv in flight
            ("late", 600 * us, 601 * us)]  # a long wait with no conv in flight: idle
  waited, other_ns = bench.untraced_waits(events, lambda name: name.startswith("conv"))
  assert waited == {"conv": 498 * us} and other_ns == 2 * us + 96 * us
  assert bench.untraced_waits([("a", 0, 5), ("b", 1, 3), ("c", 4, 9)], bool) == ({}, 0)
  # Two in flight: the wait goes to the one started last.
  waited, _ = bench.untraced_waits([("conv.1", 0, 1), ("conv.2", 1, 2), ("x", 100, 101)],
                                   lambda name: name.startswith("conv"))
  assert waited == {"conv.2": 98}


TRACE_CONVOLUTIONS = """
import json
from flaxvae.runtime import xla_flags
xla_flags.apply_defaults()
import jax, jax.numpy as jnp
from flaxvae import bench
def chain(x, w):
  for _ in range(4):
    x = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return x
x, w = jnp.ones((64, 32, 32, 8)), jnp.full((3, 3, 8, 8), 0.01)
compiled = jax.jit(chain).lower(x, w).compile()
jax.block_until_ready(compiled(x, w))
per_op, async_ns, other_ns, wall, _ = bench.trace_ops(lambda: compiled(x, w),
                                                      bench._hlo_instructions(compiled), 10)
conv_ns = sum(ns for name, ns in per_op.items() if bench.op_kind(name) == "convolution")
print(json.dumps(dict(conv_ns=conv_ns, async_ns=async_ns, wall_ns=wall * 1e9)))
"""


def test_the_profile_counts_convolutions_that_finish_after_their_thunk(tmp_path):
  # XLA:CPU's Eigen convolutions end on the intra-op pool after their traced thunk returns: a
  # profile of traced thunks alone credited a chain of convolutions with almost none of its time.
  env = dict(os.environ, XLA_FLAGS=bench.TRACE_THUNKS)
  result = subprocess.run([sys.executable, "-c", TRACE_CONVOLUTIONS], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, check=True)
  row = json.loads(result.stdout.strip().splitlines()[-1])
  assert row["conv_ns"] >= 0.8 * row["wall_ns"] and row["async_ns"] <= row["conv_ns"]


def test_conv_kernels_times_each_shape_and_totals_them_by_count(tmp_path):
  """benchmarks/conv_kernels.py (the README's convolution figures), jax side, on tiny shapes."""
  result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "conv_kernels.py"),
                           "--shapes", "3:4:4:4:3,1:4:4:8:2,3:2:4:2:1", "--batch", "2"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, check=True)
  row = json.loads(result.stdout.strip().splitlines()[-1])
  assert row["impl"] == "jax" and [s["count"] for s in row["shapes"]] == [3, 2, 1]
  assert set(row["step_total"]) == {"3x3", "1x1"}
  three = [s for s in row["shapes"] if s["kernel"] == 3]
  assert row["step_total"]["3x3"]["forward_backward_ms"] == pytest.approx(
      sum(s["count"] * s["forward_backward_ms"] for s in three), abs=0.01)
  assert all(0 < s["forward_ms"] for s in row["shapes"])


def test_conv_kernels_shapes_are_the_vdvae_configs_convolutions():
  spec = importlib.util.spec_from_file_location("conv_kernels",
                                                REPO / "benchmarks" / "conv_kernels.py")
  conv_kernels = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(conv_kernels)
  assert conv_kernels.model_shapes(str(REPO / "configs" / "fashion_mnist_vdvae.py")) == (
      conv_kernels.SHAPES)
