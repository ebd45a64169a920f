"""benchmarks/cases.py: the step cases on a tiny model, one JSON line each."""

import json

import jax
import pytest
from scripts import load_script

from tests.conftest import REPO, array_dataset, load_config, tiny_config

cases = load_script("cases")


def bench_config(**changes):
  return tiny_config(
    **{"model.hidden": (32,), "model.latent_dim": 4, "steps_per_dispatch": 2, **changes}
  )


@pytest.mark.slow  # minutes of compiles or child processes: -m 'not slow' leaves it out
def test_bench_cases_emit_one_json_line_each():
  lines = []
  rows = cases.run_cases(
    bench_config(),
    ("default", "dispatch", "scaling"),
    steps=2,
    windows=1,
    device_counts=(1, 8),
    dataset=array_dataset(128, 16),
    emit=lines.append,
  )
  assert [json.loads(line) for line in lines] == rows
  assert [r["case"] for r in rows] == ["default", "dispatch", "dispatch", "scaling", "scaling"]
  for row in rows:
    assert row["examples_per_s"] > 0 and row["flops_per_example"] > 0 and 0 < row["mfu"]
    assert row["compile_s"] >= 0 and row["device_kind"] and row["jax"] == jax.__version__
  eight = rows[-1]
  assert eight["num_devices"] == 8 and eight["allreduce_bytes"] > 0
  # Same seed and global batch: the 8-device run computes the 1-device run's numbers.
  assert eight["loss"] == pytest.approx(rows[-2]["loss"], rel=1e-4)


def test_an_unknown_case_is_refused_with_the_cases_there_are():
  with pytest.raises(SystemExit, match="unknown --cases \\['fastest'\\]: choose from default"):
    cases.parse(
      [
        "cases.py",
        "--config",
        str(REPO / "configs" / "fashion_mnist_mlp.py"),
        "--cases",
        "default,fastest",
      ]
    )


@pytest.mark.slow  # minutes of compiles or child processes: -m 'not slow' leaves it out
def test_eval_case_times_the_importance_pass_against_its_flop_limit():
  config = bench_config(
    **{
      "eval.final_num_importance_samples": 8,
      "eval.ais_steps": 2,
      "eval.ais_chains": 1,
      "eval.ais_leapfrog": 1,
    }
  )
  row = cases.eval_row(config, array_dataset(32, 16), num_examples=16, ais_examples=8)
  assert row["case"] == "eval" and row["num_examples"] == 16
  assert row["num_importance_samples"] == 8 and row["flops"] > 0
  for key in ("seconds", "flop_limit_seconds", "ais_seconds_per_1000", "iwae_seconds_per_1000"):
    assert row[key] >= 0  # rounded to 0.1 s: a tiny model's pass may round to 0


@pytest.mark.slow  # minutes of compiles or child processes: -m 'not slow' leaves it out
def test_depth_case_compiles_each_depth_with_and_without_scan_and_remat():
  config = load_config("fashion_mnist_vdvae", "tiny")
  rows = cases.depth_rows(config, depths=(1, 2), emit=lambda line: None)
  assert [(r["depth"], r["scan_blocks"], r["remat"]) for r in rows] == [
    (d, s, m) for d in (1, 2) for s in ("unroll", "scan") for m in (False, True)
  ]
  assert all(r["compile_s"] > 0 and r["parameters"] > 0 for r in rows)
  by = {(r["depth"], r["scan_blocks"], r["remat"]): r["parameters"] for r in rows}
  assert by[(2, "scan", False)] == by[(2, "unroll", True)] > by[(1, "scan", False)]
