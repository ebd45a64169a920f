"""benchmarks/report.py (`make bench` -> BENCHMARKS.md) and benchmarks/results.py (RESULTS.md):
caching, partial measurements, the records that outlive runs/."""

import json
import shutil
import sys

from scripts import load_script

from tests.conftest import REPO


def test_the_anchor_comparison_renders_from_its_record_with_each_side_at_its_best_round():
  """The comparison with Efficient-VDVAE's own code is a committed record (that code is run by
  hand, never committed); the report credits each side with its best round."""
  report = load_script("report")
  with open(REPO / report.ANCHOR_RECORD) as f:
    rec = json.load(f)
  line = report.anchor_line()
  ratio = min(rec["seconds_per_step"]["anchor"]) / min(rec["seconds_per_step"]["flaxvae"])
  assert f"**{ratio:.2f}x**" in line and rec["measured"] in line and "protocol" in rec


def test_make_bench_measures_each_command_once_and_resumes_from_its_cache(tmp_path):
  """benchmarks/report.py's cache: a stopped `make bench` resumes, parts measured apart."""
  report = load_script("report")
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
  report = load_script("report")

  def row(devices, mesh="data", compile_s=1.0, **extra):
    return dict(
      model="vdvae",
      num_devices=devices,
      mesh=mesh,
      remat=False,
      batch_size=32,
      image_shape=[64, 64, 3],
      compile_s=compile_s,
      **extra,
    )

  earlier = [row(8), row(64, "data:8,fsdp:8")]  # from before rows carried their config
  new = [row(1, config="cifar10_vdvae"), row(8, compile_s=2.0, config="imagenet64_vdvae")]
  merged = report.merge_aot(new, earlier)
  assert [(report.aot_identity(r)[:2], r["compile_s"]) for r in merged] == [
    (("cifar10_vdvae", 1), 1.0),
    (("imagenet64_vdvae", 8), 2.0),
    (("imagenet64_vdvae", 64), 1.0),
  ]
  assert {p[0] for p in report.aot_plan()} == set(report.AOT_CONFIGS)
  assert all(
    {(name, 1, ()), (name, 8, ())} <= {(n, d, tuple(f)) for n, d, f in report.aot_plan()}
    for name in report.AOT_CONFIGS
  )  # every config on 1 and 8 devices


def test_the_code_fingerprint_changes_with_the_package_and_not_with_the_docs(tmp_path):
  report = load_script("report")
  (tmp_path / "flaxvae").mkdir()
  (tmp_path / "flaxvae" / "step.py").write_text("x = 1\n")
  before = report.code_fingerprint(str(tmp_path))
  (tmp_path / "README.md").write_text("figures\n")
  assert report.code_fingerprint(str(tmp_path)) == before
  (tmp_path / "flaxvae" / "step.py").write_text("x = 2\n")
  assert report.code_fingerprint(str(tmp_path)) != before


def test_results_rows_survive_their_run_dirs(tmp_path, monkeypatch):
  """benchmarks/results.py: a finished row's figures go into its record in git, so RESULTS.md
  is written the same on a fresh checkout, where runs/ is gone."""
  results = load_script("results")
  monkeypatch.setattr(results, "RUNS", str(tmp_path / "runs"))
  monkeypatch.setattr(results, "RECORDS", str(tmp_path / "records"))
  run_dir = tmp_path / "runs" / "quality" / "conv_8bit"
  run_dir.mkdir(parents=True)
  final = {
    "step": 40,
    "log_px": -900.0,
    "nll": 900.0,
    "bits_per_dim": 1.6,
    "elbo": -910.0,
    "active_units_by_layer": [7],
  }
  (run_dir / "eval.json").write_text(json.dumps(final))
  (run_dir / "metrics.jsonl").write_text(
    "".join(
      json.dumps(r) + "\n"
      for r in (
        {"split": "train", "step": 20, "wall_s": 60.0},
        {"split": "test", "step": 20, "log_px": -950.0, "bits_per_dim": 1.7},
      )
    )
  )
  written = results.quality_table()
  assert "| conv | 8bit | 40 | 900.00 | 1.6000 |" in written
  shutil.rmtree(tmp_path / "runs")
  assert results.quality_table() == written  # read back from the record
  curve = results.record("quality", "conv_8bit")["periodic"]
  assert curve == [
    {"split": "test", "step": 20, "log_px": -950.0, "bits_per_dim": 1.7, "wall_minutes": 1.0}
  ]


def test_make_bench_keeps_the_sections_it_did_not_measure(tmp_path, monkeypatch):
  """BENCHMARKS.md is the record (runs/, where the cache lives, is gone on a fresh machine):
  `--parts depth` replaces the depth section and keeps every other part with its raw rows."""
  report = load_script("report")
  out = tmp_path / "BENCHMARKS.md"
  out.write_text(
    "\n".join(
      [
        "# Benchmarks",
        "",
        "old header",
        "",
        "## VDVAE (x) against its PyTorch twin",
        "",
        "_Measured 2026-12-02 10:00, by this report._",
        "",
        "| a | b |",
        "",
        "## Depth: old",
        "",
        "old depth table",
        "",
        "## Raw results",
        "",
        "### vdvae",
        "",
        "```json",
        '{"model": "vdvae", "examples_per_s": 5}',
        "```",
        "",
        "### depth",
        "",
        "```json",
        '{"depth": 1}',
        "```",
        "",
      ]
    )
  )
  depth_rows = [{"depth": 4, "scan_blocks": "scan", "remat": True, "compile_s": 1.0}]
  monkeypatch.setattr(report, "json_lines", lambda cmd, **kw: depth_rows)
  monkeypatch.setattr(
    sys,
    "argv",
    ["report.py", "--out", str(out), "--parts", "depth", "--cache", str(tmp_path / "cache.jsonl")],
  )
  report.main()
  text = out.read_text()
  assert "| a | b |" in text and "_Measured 2026-12-02 10:00, by an earlier report._" in text
  assert "old depth table" not in text and "| 4 | scan | True | 1.0 |" in text
  assert report.earlier_report(str(out))["vdvae"][1] == [{"model": "vdvae", "examples_per_s": 5}]
  assert report.earlier_report(str(out))["depth"][1] == depth_rows
  assert "Kept from an earlier report: vdvae." in text
