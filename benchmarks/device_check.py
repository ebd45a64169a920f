"""`make device-check`: what to run on a machine with an accelerator (one GPU or TPU chip) in a
few minutes (issue 34, item 9), and the figures to keep from it.

    .venv/bin/python benchmarks/device_check.py [--quick] [--out BENCHMARKS.md] [--json FILE]
    .venv/bin/python benchmarks/device_check.py --from_json FILE   # rows measured elsewhere

1. The tests that behave differently on an accelerator, by name (tests/...): the KL
   autoencoder's bfloat16 numerics against float32, its remat and scan paths against the
   plain one, and both players training through `train()` with finite losses.
2. Throughput of one device: LDM's kl-f8 two-player step at 256 px in bfloat16
   (configs/imagenet256_kl_f8.py, the discriminator and its loss on from step 0, so every
   timed step runs both players) and VDVAE's ImageNet-64 step in bfloat16
   (configs/imagenet64_vdvae.py): examples/s (the median of timed windows after a warm-up),
   FLOPs per example from XLA's cost analysis, MFU against the device's peak (the dense
   bfloat16 peak of a known accelerator; on a CPU the float32 matmul rate measured here), and
   memory: the compiled step's (arguments + temp) and the device's peak in use. Each case runs
   in its own process, so its peak is its own and a case that runs out of memory is retried at
   half the batch, then reported as failed, without stopping the others.

--quick shrinks everything to run on a CPU in a couple of minutes (the configs' tiny variants,
the fast tests only): the test of this script runs it so. LPIPS's weights are not needed:
where none are prepared, random ones of VGG16's shapes are written to a temporary
FLAXVAE_WEIGHTS_DIR (the step's cost does not depend on their values).

The rows go to the "Device check" section of BENCHMARKS.md (sections.py; `make bench` keeps it):
a run replaces the rows of its own device kind (and --quick or not) and keeps the others, so a
GPU's rows, measured on a machine whose files do not come back, are added here with
--from_json from the --json file that run wrote.
"""

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import sections

HEADING = "## Device check"
SCRIPT = "benchmarks/device_check.py"
AUTOENCODER_TESTS = "tests/models/test_autoencoder_kl.py"
# (name, pytest node ids): the tests that matter on an accelerator. --quick runs them with
# -m "not slow" (one remat+scan case instead of three) and leaves out the two-player training.
CHECKS = (
  (
    "bfloat16",
    [f"{AUTOENCODER_TESTS}::test_bfloat16_computes_in_bfloat16_with_float32_parameters"],
  ),
  ("remat_and_scan", [f"{AUTOENCODER_TESTS}::test_remat_and_scan_give_the_plain_numbers"]),
  ("two_players", ["tests/train/test_two_players.py::test_both_players_train_and_log_their_terms"]),
)
QUICK_CHECKS = ("bfloat16", "remat_and_scan")
# Dense bfloat16 peaks (FLOP/s) by device_kind (the first name it contains): vendors' figures.
PEAKS = (
  ("H100 PCIe", 756e12),
  ("H100", 989e12),
  ("H200", 989e12),
  ("GH200", 989e12),
  ("A100", 312e12),
  ("L4", 121e12),
  ("TPU v4", 275e12),
  ("TPU v5 lite", 197e12),
  ("TPU v5", 459e12),
  ("TPU v6 lite", 918e12),
)
# The throughput cases: config, batch on an accelerator, image shape, config overrides.
CASES = {
  "kl_f8_256_two_players": dict(
    path="configs/imagenet256_kl_f8.py",
    batch=8,
    shape=(256, 256, 3),
    overrides={"adversary.start_step": 0, "adversary.train_start": 0},
  ),
  "vdvae_imagenet64": dict(
    path="configs/imagenet64_vdvae.py", batch=8, shape=(64, 64, 3), overrides={}
  ),
}
QUICK = dict(batch=4, shapes={"kl_f8_256_two_players": (32, 32, 3)}, windows=2, seconds=0.5)


def peak_flops(device_kind, platform):
  """(FLOP/s, where it comes from) for MFU: the table's peak of a known accelerator, else the
  float32 matmul rate measured on this device."""
  for name, peak in PEAKS:
    if name.lower() in device_kind.lower():
      return peak, f"{name} dense bf16 peak"
  from flaxvae import bench

  return bench.matmul_peak(), f"measured {platform} f32 matmul"


def ensure_lpips_weights():
  """Random LPIPS weights in a temporary FLAXVAE_WEIGHTS_DIR when none are prepared; returns
  the directory made (None when the real ones are there)."""
  import numpy as np

  from flaxvae import weights
  from flaxvae.objectives import perceptual

  if os.path.exists(weights.weights_path(perceptual.NAME)):
    return None
  directory = tempfile.mkdtemp(prefix="flaxvae-random-lpips-")
  atexit.register(shutil.rmtree, directory, ignore_errors=True)
  os.environ["FLAXVAE_WEIGHTS_DIR"] = directory
  draw = np.random.default_rng(0).uniform  # non-negative: lpips' heads must be
  arrays = {k: draw(0.0, 0.05, s).astype(np.float32) for k, s in perceptual.weight_shapes().items()}
  weights.save(perceptual.NAME, arrays, weights.weights_path(perceptual.NAME, directory))
  return directory


def case_config(case, quick, batch):
  """The case's config (tiny variant with --quick), one device, bfloat16, `batch`."""
  from flaxvae import bench, defaults

  spec = CASES[case]
  config = defaults.load_config_file(os.path.join(ROOT, spec["path"]), "tiny" if quick else None)
  changes = {"parallel.num_devices": 1, "dtype": "bfloat16", "batch_size": batch}
  changes.update({"steps_per_dispatch": 1, "scan_unroll": 1, **spec["overrides"]})
  return bench.with_keys(config, **changes)


def measure_case(case, quick, batch):
  """One throughput row of `case` on this process's first device (run in a child)."""
  import jax
  import numpy as np

  from flaxvae import bench, data

  ensure_lpips_weights()
  shape = QUICK["shapes"].get(case, CASES[case]["shape"]) if quick else CASES[case]["shape"]
  config = case_config(case, quick, batch)
  pixels = np.random.default_rng(0).integers(0, 256, (2 * batch, *shape), dtype=np.uint8)
  dataset = data.ArrayDataset({"train": pixels, "test": pixels[:batch]}, name="random")
  windows = QUICK["windows"] if quick else 5
  measured = bench.time_trainer(
    config, windows=windows, window_seconds=QUICK["seconds"] if quick else 2.0, dataset=dataset
  )
  flops = bench.lowered_step_flops(config, shape) / batch
  device = jax.devices()[0]
  peak, peak_source = peak_flops(device.device_kind, device.platform)
  rate = measured["examples_per_s"]
  memory = measured["memory"] or {}
  stats = device.memory_stats() or {}
  compiled = memory.get("argument_size_in_bytes", 0) + memory.get("temp_size_in_bytes", 0)
  return dict(
    case=case,
    config=CASES[case]["path"] + (":tiny" if quick else ""),
    image_shape=list(shape),
    batch_size=batch,
    dtype=config.dtype,
    compile_s=round(measured["compile_s"], 1),
    step_ms=round(1000 * batch / rate, 2),
    examples_per_s=round(rate, 2),
    window_examples_per_s=[round(r, 2) for r in measured["window_rates"]],
    flops_per_example=round(flops),
    peak_flop_per_s=round(peak),
    peak_source=peak_source,
    mfu=round(flops * rate / peak, 4),
    compiled_memory_gib=round(compiled / 2**30, 3) if memory else None,
    peak_memory_gib=round(stats["peak_bytes_in_use"] / 2**30, 3)
    if "peak_bytes_in_use" in stats
    else None,
    loss=measured["loss"],
    finite=bool(np.isfinite(measured["loss"])),
    **bench.environment(),
  )


def child_environment():
  """bench.environment() of this machine's default device, read in a child process."""
  command = [sys.executable, os.path.join(ROOT, SCRIPT), "--environment"]
  out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def run_case(case, quick, timeout_s):
  """The case's row, measured in a child process; on a failure (out of memory) once more at
  half the batch, then a row that says what failed."""
  batch = QUICK["batch"] if quick else CASES[case]["batch"]
  error = ""
  for attempt in range(2):
    command = [sys.executable, os.path.join(ROOT, SCRIPT), f"--case={case}", f"--batch={batch}"]
    command += ["--quick"] if quick else []
    print("+", " ".join(command), file=sys.stderr, flush=True)
    try:
      done = subprocess.run(
        command, capture_output=True, text=True, cwd=ROOT, timeout=timeout_s, check=False
      )
    except subprocess.TimeoutExpired:
      error = f"timed out after {timeout_s} s"
      break
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 0 and rows:
      return rows[-1]
    lines = done.stderr.strip().splitlines()
    error = lines[-1] if lines else f"exit status {done.returncode}"
    print(done.stderr[-3000:], file=sys.stderr)
    if attempt == 0 and batch > 1:
      batch //= 2
  return dict(case=case, batch_size=batch, failed=error[:300])


def run_checks(quick, timeout_s):
  """Each check's pytest run on this machine's default device: rows of (name, passed, s)."""
  rows = []
  # conftest.py selects the CPU unless JAX_PLATFORMS is set: empty lets JAX pick the device.
  path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", ""), PYTHONPATH=path)
  for name, nodes in CHECKS:
    if quick and name not in QUICK_CHECKS:
      continue
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *nodes]
    command += ["-m", "not slow"] if quick else []
    print("+", " ".join(command), file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
      done = subprocess.run(
        command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout_s, check=False
      )
      summary = (done.stdout.strip().splitlines() or [""])[-1]
      passed = done.returncode == 0
      if not passed:
        print(done.stdout[-4000:], file=sys.stderr)
    except subprocess.TimeoutExpired:
      summary, passed = f"timed out after {timeout_s} s", False
    rows.append(
      dict(check=name, passed=passed, summary=summary, seconds=round(time.perf_counter() - start))
    )
  return rows


def render(rows):
  """The section: a throughput table, a checks table and the raw rows."""
  throughput = [r for r in rows if "case" in r]
  checks = [r for r in rows if "check" in r]
  gib = lambda v: "" if v is None else v
  return [
    HEADING + " (`make device-check`: accelerator tests and throughput on one device)",
    "",
    "_Written by `" + SCRIPT + "`; each row names its device and when it was measured._",
    "",
    *sections.table(
      [
        "device",
        "case",
        "config",
        "px",
        "batch",
        "dtype",
        "examples/s",
        "step ms",
        "GFLOP/example",
        "MFU",
        "peak used for MFU",
        "compiled GiB",
        "peak in use GiB",
        "finite loss",
        "compile s",
        "measured",
        "command",
      ],
      [
        [r["device_kind"], r["case"], "`" + r.get("config", "") + "`"]
        + (
          [r["image_shape"][0], r["batch_size"], r["dtype"], r["examples_per_s"], r["step_ms"]]
          + [round(r["flops_per_example"] / 1e9, 1), r["mfu"], r["peak_source"]]
          + [gib(r["compiled_memory_gib"]), gib(r["peak_memory_gib"]), r["finite"]]
          + [r["compile_s"], r["measured"]]
          if "failed" not in r
          else ["", r["batch_size"], "", f"failed: {r['failed']}", *[""] * 8, r["measured"]]
        )
        + [command_cell(r)]
        for r in throughput
      ],
    ),
    "",
    *sections.table(
      ["device", "check", "passed", "pytest's summary", "s", "measured", "command"],
      [
        [r["device_kind"], r["check"], r["passed"], r["summary"], r["seconds"], r["measured"]]
        + [command_cell(r)]
        for r in checks
      ],
    ),
    "",
    "`make device-check` runs `" + SCRIPT + "`; rows run with `--quick` (the configs' tiny "
    "variants on a CPU) test the script and are no measurement of the models. The kl-f8 "
    "case has the discriminator on from step 0, so every timed step runs both players and "
    "LPIPS. GFLOP/example from XLA's "
    "cost analysis of one step (forward, backward, update); MFU against the peak named. "
    "`compiled GiB` is the step's arguments + temp from XLA's memory analysis; `peak in use` "
    "the device allocator's peak, where the device reports one.",
    "",
    *sections.raw_block(rows),
  ]


def command_cell(row):
  return f"`{row['command']}`" if row.get("command") else ""


def merge(earlier, fresh):
  """`fresh` rows replace the earlier rows of the same device kind and quickness."""
  key = lambda r: (r.get("device_kind"), r.get("quick", False))
  replaced = {key(r) for r in fresh}
  return [r for r in earlier if key(r) not in replaced] + list(fresh)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--quick", action="store_true", help="tiny shapes, fast tests: a CPU run")
  parser.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
  parser.add_argument("--json", default=None, help="also write the rows here")
  parser.add_argument("--from_json", default=None, help="add rows written by --json elsewhere")
  parser.add_argument("--skip_checks", action="store_true", help="throughput only")
  parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # a child's one case
  parser.add_argument("--batch", type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument("--environment", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--timeout_s", type=int, default=240, help="per test or case")
  args = parser.parse_args()
  if args.case:
    print(json.dumps(measure_case(args.case, args.quick, args.batch)))
    return
  if args.environment:
    from flaxvae import bench

    print(json.dumps(bench.environment()))
    return
  if args.from_json:
    with open(args.from_json) as f:
      fresh = [json.loads(line) for line in f if line.startswith("{")]
  else:
    # This process never starts JAX: the accelerator's memory is left to the children.
    environment = child_environment()
    when = time.strftime("%Y-%m-%d %H:%M")
    command = SCRIPT + (" --quick" if args.quick else "")
    print(f"device: {environment['device_kind']} ({environment['platform']})", flush=True)
    checks = [] if args.skip_checks else run_checks(args.quick, args.timeout_s)
    cases = [run_case(case, args.quick, args.timeout_s) for case in CASES]
    fresh = [
      dict(environment, **r, quick=args.quick, measured=when, command=command)
      for r in checks + cases
    ]
    for r in fresh:
      print(json.dumps(r), flush=True)
    if args.json:
      with open(args.json, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in fresh))
  rows = merge(sections.raw_rows(sections.read(args.out, HEADING)), fresh)
  sections.write(args.out, HEADING, render(rows))
  failed = [r.get("check") or r["case"] for r in fresh if r.get("failed") or not r.get("passed", 1)]
  failed += [r["case"] for r in fresh if "finite" in r and not r["finite"]]
  print(f"wrote {args.out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  main()
