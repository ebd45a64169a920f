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
  `--parts depth` replaces the depth section and keeps every other part with its raw rows,
  as written where the rows cannot draw it again."""
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
        "## The final evaluation at the machine's limit",
        "",
        "old eval text",
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
        "### eval",
        "",
        "```json",
        '{"case": "eval", "command": "a row in a form this code no longer reads"}',
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
  monkeypatch.setattr(report, "run_json_lines", lambda cmd, env=None: depth_rows)
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
  command = ".venv/bin/python benchmarks/cases.py --config configs/fashion_mnist_vdvae.py"
  assert report.earlier_report(str(out))["depth"][1] == [
    dict(depth_rows[0], command=f"{command} --cases depth")
  ]
  assert "old eval text" in text  # its rows name a command but cannot draw it again
  assert "Kept from an earlier report: vdvae, eval." in text
  assert "except rows measured before rows carried it (in vdvae, eval)" in text


def fake_rows(cmd):
  """What each command of `make bench` prints, in fields the report reads (no measurement)."""
  argv = [str(c) for c in cmd]
  flags = dict(a.split("=", 1) for a in argv if a.startswith("--") and "=" in a)
  cases = argv[argv.index("--cases") + 1].split(",") if "--cases" in argv else None
  step = dict(
    model="vdvae" if "vdvae" in " ".join(argv) else "conv" if "conv" in " ".join(argv) else "mlp",
    num_devices=1,
    steps_per_dispatch=4,
    scan_unroll=4,
    compile_s=2.0,
    step_ms=10.0,
    examples_per_s=100.0,
    limit_examples_per_s=300,
    flops_per_example=8e6,
    mfu=0.3,
    cpu="Test CPU",
  )
  if "peer_mlp_vae.py" in argv[1]:
    return [dict(impl=argv[2], examples_per_s=90)]
  if "torch_kl_autoencoder" in argv[1]:
    phase, weight = (argv[argv.index(flag) + 1] for flag in ("--phase", "--adaptive_weight"))
    twin = dict(impl="torch_klae", examples_per_s=3.0, flops_per_example=2e9, mfu=0.2)
    return [dict(twin, phase=phase, adaptive_weight=weight)]
  if "torch_" in argv[1]:
    return [dict(impl="torch_conv" if "conv" in argv[1] else "torch_vdvae", examples_per_s=80)]
  if "--aot" in argv:
    mesh = flags.get("--mesh", "data")
    return [
      dict(
        num_devices=int(flags["--devices"]),
        mesh=mesh,
        remat="--config.model.remat=True" in argv,
        batch_size=int(flags.get("--config.batch_size", 32)),
        parameters=1e8,
        flops_per_example=1e11,
        per_device_parameter_gib=0.4,
        per_device_optimizer_gib=0.8,
        per_device_ema_gib=0.4,
        compile_s=80.0,
        image_shape=[64, 64, 3],
      )
    ]
  if cases is None:  # the default bench cases
    return [dict(step, case=c) for c in ("default", "dispatch", "scaling")]
  if cases == ["profile"]:
    kinds = {"convolution": 5.0, "dot": 3.0}
    return [
      dict(
        case="profile",
        steps=4,
        threads=2,
        busy_ms_per_step=8.0,
        wall_ms_per_step=9.0,
        ms_per_step_by_kind=kinds,
        share_by_kind={"convolution": 0.6, "dot": 0.4},
        heaviest=[dict(op="convolution.1", shape="f32[8]", ms_per_step=1.0)],
      )
    ]
  if cases == ["eval"]:
    keys = ("num_importance_samples", "num_examples", "seconds", "flop_limit_seconds")
    keys += ("ratio_to_limit", "iwae_seconds_per_1000", "ais_steps", "ais_chains")
    return [dict(dict.fromkeys(keys, 1), ais_leapfrog=5, ais_seconds_per_1000=2.0, case="eval")]
  if cases == ["depth"]:
    return [dict(depth=d, scan_blocks="scan", remat=False, compile_s=1.0) for d in (4, 16)]
  return [dict(step, case=c) for c in cases]


def generated_tables(text):
  """[(header cells, row cells, the line after the table)] of every table above the raw rows."""
  lines, tables = text.split("## Raw results")[0].splitlines(), []
  for i, line in enumerate(lines):
    if line.startswith("|---"):
      header = [c.strip() for c in lines[i - 1].strip("|").split("|")]
      end = next(j for j in range(i + 1, len(lines) + 1) if not lines[j].startswith("| "))
      rows = [[c.strip() for c in row.strip("|").split("|")] for row in lines[i + 1 : end]]
      tables += [(header, rows, lines[end + 1])]
  return tables


def test_every_row_of_every_generated_table_names_the_command_that_measured_it(
  tmp_path, monkeypatch
):
  """Issue 33: BENCHMARKS.md is generated with the command of every row. A table's rows name
  their commands in a `command` column, or one line under the table when one command measured
  them all; each raw row carries it too, and a later `--parts` run draws a kept section again
  from those raw rows, commands included."""
  report, ran = load_script("report"), []
  monkeypatch.setattr(
    report, "run_json_lines", lambda cmd, env=None: ran.append(cmd) or fake_rows(cmd)
  )
  monkeypatch.setattr(
    report,
    "trainer_throughput",
    lambda config: dict(examples_per_s=120.0, steps=100, train_phase_s=2.0, process_wall_s=3.0),
  )
  out, cache = tmp_path / "BENCHMARKS.md", str(tmp_path / "cache.jsonl")
  argv = ["report.py", "--out", str(out), "--cache", cache, "--rounds", "2"]
  monkeypatch.setattr(sys, "argv", argv)
  report.main()
  commands = {report.shown(cmd) for cmd in ran}
  commands |= {
    report.shown(report.trainer_command(c))
    for c in (report.PEER_PROTOCOL_CONFIG, report.DEFAULT_CONFIG)
  }

  def check(text):
    tables = generated_tables(text)
    assert len(tables) == 10  # mlp; conv, vdvae, klae, each with a profile; depth, aot, cases
    for header, rows, after in tables:
      if header[-1] == "command":
        shown = [row[-1] for row in rows]
      else:
        assert after.startswith("Command: "), header
        shown = [after.removeprefix("Command: ")] * len(rows)
      assert rows and all(s.strip("`") in commands for s in shown), (header, shown)
    for part, (_, rows) in report.earlier_report(str(out)).items():
      assert all(r["command"] in commands for r in rows), part
    assert "0.64x" not in text and "65 MB" not in text and "docs/performance.md" in text
    eval_section = text.split("## The final evaluation")[1].split("\n## ")[0]
    assert "Command: `.venv/bin/python benchmarks/cases.py" in eval_section
    effvdvae = next(line for line in text.splitlines() if "Efficient-VDVAE's binarized" in line)
    assert "torch_vdvae.py --config effvdvae" in effvdvae and "fashion_mnist_effvdvae" in effvdvae

  text = out.read_text()
  check(text)
  assert "by an earlier report" not in text
  # A later sitting measures only the depth: every other section is drawn again from its raw
  # rows, with their commands, and keeps the date it was measured.
  monkeypatch.setattr(sys, "argv", [*argv, "--parts", "depth", "--fresh"])
  report.main()
  again = out.read_text()
  check(again)
  assert (
    again.count(", by an earlier report._") == 6 and "Kept from an earlier report: mlp," in again
  )
  assert "_Drawn from the raw rows of the MLP and conv sections" in again
