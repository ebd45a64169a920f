"""The sections of BENCHMARKS.md that their own scripts write (benchmarks/sections.py), which
`make bench` keeps; benchmarks/aot_autoencoder.py's table; benchmarks/device_check.py
(`make device-check`) run on this CPU with --quick, as on an accelerator but shrunk."""

import json
import subprocess
import sys

import jax
import pytest
from scripts import load_script

from tests.conftest import REPO

AOT_ROW = dict(
  case="aot",
  num_devices=8,
  mesh="data:2,fsdp:4",
  remat=True,
  batch_size=16,
  image_shape=[512, 512, 3],
  parameters=83_653_863,
  adversary_parameters=2_765_633,
  per_device_parameter_gib=0.078,
  per_device_optimizer_gib=0.156,
  per_device_ema_gib=0.078,
  per_device_adversary_parameter_gib=0.003,
  per_device_adversary_optimizer_gib=0.005,
  per_device_adversary_stats_gib=0.0,
  per_device_argument_gib=0.4,
  per_device_temp_gib=3.0,
  per_device_activation_gib_per_example=0.25,
  largest_batch_per_device=38,
  flops_per_example=14e12,
  compile_s=90.0,
  device_kind="cpu",
  measured="2026-12-07 06:00",
  command="flaxvae bench --aot ...",
)


def test_make_bench_keeps_the_sections_other_scripts_own(tmp_path, monkeypatch):
  sections, report = load_script("sections"), load_script("report")
  out = tmp_path / "BENCHMARKS.md"
  out.write_text("# Benchmarks\n\n## Depth: old\n\nold depth\n\n## Raw results\n")
  sections.write(str(out), "## Device check", ["## Device check (x)", "", "| gpu row |"])
  sections.write(str(out), "## Device check", ["## Device check (x)", "", "| new gpu row |"])
  assert sections.read(str(out), "## Device check") == [
    "## Device check (x)",
    "",
    "| new gpu row |",
    "",
  ]
  text = out.read_text()
  assert "| gpu row |" not in text and text.index("## Device") < text.index("## Raw results")
  rows = [{"depth": 4, "scan_blocks": "scan", "remat": True, "compile_s": 1.0}]
  monkeypatch.setattr(report, "run_json_lines", lambda cmd, env=None: rows)
  cache = str(tmp_path / "cache.jsonl")
  monkeypatch.setattr(
    sys, "argv", ["report.py", "--out", str(out), "--parts", "depth", "--cache", cache]
  )
  report.main()
  text = out.read_text()
  assert "| new gpu row |" in text and "old depth" not in text
  assert text.index("## Device check") < text.index("## Raw results")


def test_the_aot_table_gives_each_players_memory_and_the_largest_batch_per_device(tmp_path):
  aot = load_script("aot_autoencoder")
  args = type("Args", (), dict(sizes="256,512,1024", devices="8,64", meshes="data,fsdp"))
  args.remat, args.per_device_batch = "no,yes", 1
  commands = aot.plan(args)
  assert len(commands) == 24 and len({" ".join(c) for c in commands}) == 24
  fsdp_remat = aot.cell_command(512, 64, "fsdp", True, 2)
  assert "--mesh=data:8,fsdp:8" in fsdp_remat and "--config.model.remat=True" in fsdp_remat
  assert "--config.batch_size=128" in fsdp_remat and "--image_shape=512" in fsdp_remat
  lines = aot.render([AOT_ROW])
  row = next(line for line in lines if line.startswith("| 512 "))
  # AE 0.078 + 0.156 + 0.078 GiB; D 0.008; 0.25 GiB per global example is 2 per device
  assert "| 0.312 | 0.0080 |" in row and "| 2.00 | 38 |" in row and "| 14000 |" in row
  assert json.loads(lines[-2]) == AOT_ROW  # the raw rows resume a stopped run


def test_device_check_names_the_peak_it_divides_by_and_keeps_other_devices_rows():
  check = load_script("device_check")
  assert check.peak_flops("NVIDIA H100 80GB HBM3", "gpu") == (989e12, "H100 dense bf16 peak")
  assert check.peak_flops("NVIDIA H100 PCIe", "gpu")[0] == 756e12
  assert check.peak_flops("NVIDIA H200", "gpu")[0] == 989e12
  gpu = dict(device_kind="NVIDIA H200", quick=False, case="a", measured="x")
  old_cpu = dict(device_kind="cpu", quick=True, case="a", measured="old")
  new_cpu = dict(old_cpu, measured="new")
  assert check.merge([gpu, old_cpu], [new_cpu]) == [gpu, new_cpu]
  failed = dict(gpu, batch_size=4, failed="RESOURCE_EXHAUSTED")
  table = [line for line in check.render([failed]) if line.startswith("| NVIDIA")]
  assert table[0].count("|") == 18  # a failed case keeps the table's 17 columns


@pytest.mark.slow  # compiles both tiny steps and runs two tests in children: minutes here
def test_device_check_runs_on_this_cpu_shortened(tmp_path):
  out, rows = tmp_path / "BENCHMARKS.md", tmp_path / "rows.jsonl"
  out.write_text("# Benchmarks\n\n## Raw results\n")
  script = str(REPO / "benchmarks" / "device_check.py")
  command = [sys.executable, script, "--quick", f"--out={out}", f"--json={rows}"]
  done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False)
  assert done.returncode == 0, done.stdout + done.stderr[-3000:]
  written = [json.loads(line) for line in rows.read_text().splitlines()]
  assert {r["check"] for r in written if "check" in r} == {"bfloat16", "remat_and_scan"}
  assert all(r["passed"] for r in written if "check" in r)
  cases = {r["case"]: r for r in written if "case" in r}
  assert set(cases) == {"kl_f8_256_two_players", "vdvae_imagenet64"}
  for row in cases.values():
    assert row["finite"] and row["examples_per_s"] > 0 and 0 < row["mfu"] < 1
    assert row["device_kind"] and row["quick"] and row["flops_per_example"] > 0
  text = out.read_text()
  assert "## Device check" in text and "kl_f8_256_two_players" in text
  assert text.index("## Device check") < text.index("## Raw results")


@pytest.mark.slow  # writes and reads VGG16's 14.7M weights: seconds, more on a loaded host
def test_without_prepared_weights_lpips_gets_random_ones_of_vgg16s_shapes(tmp_path, monkeypatch):
  """The accelerator has no weights and no internet: the step's cost does not depend on them."""
  from flaxvae.objectives import perceptual

  check = load_script("device_check")
  monkeypatch.setenv("FLAXVAE_WEIGHTS_DIR", str(tmp_path))
  directory = check.ensure_lpips_weights()
  assert directory and directory != str(tmp_path)
  loaded = perceptual.load_lpips_weights()  # from the directory it now points at
  assert sum(a.size for a in jax.tree.leaves(loaded)) > 14_000_000
  assert check.ensure_lpips_weights() is None  # now there: nothing made again
