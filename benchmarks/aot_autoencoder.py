"""The latent KL autoencoder for accelerators, ahead of time (issue 34): `flaxvae bench --aot`
on configs/imagenet256_kl_f8.py at 256, 512 and 1024 px, on 8 and 64 simulated devices,
data-parallel and fsdp, with and without remat, both players in the step, bfloat16 compute and
the autoencoder's EMA kept. Writes its section of BENCHMARKS.md (sections.py).

    .venv/bin/python benchmarks/aot_autoencoder.py [--sizes 256,512,1024] [--devices 8,64]
        [--meshes data,fsdp] [--remat no,yes] [--per_device_batch 1] [--out BENCHMARKS.md]

Each cell is one `flaxvae bench --aot` command (printed in the table), run one at a time; its
rows are kept in the section, so a stopped run resumes where it was and a partial run
(--sizes 1024) keeps the other cells (`--fresh` measures them again). Each cell compiles the
two-player step twice (the per-device batch and twice it): the largest per-device batch in
80 GB is extrapolated linearly from those two memory figures.
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAXVAE = os.path.join(ROOT, ".venv", "bin", "flaxvae")
CONFIG = "configs/imagenet256_kl_f8.py"
HEADING = "## AOT: the latent KL autoencoder"
FSDP_MESH = {8: "data:2,fsdp:4", 64: "data:8,fsdp:8"}
# As on accelerators: bfloat16 compute (float32 parameters and optimizer), the EMA kept.
COMMON = ("--config.dtype=bfloat16", "--config.ema_decay=0.9999", "--device_memory=80GB")


def cell_command(size, devices, mesh, remat, per_device_batch):
  """The `flaxvae bench --aot` command of one cell, as the table shows it."""
  command = [
    os.path.relpath(FLAXVAE, ROOT),
    "bench",
    "--aot",
    "--config",
    CONFIG,
    f"--devices={devices}",
    f"--image_shape={size}",
    f"--config.batch_size={devices * per_device_batch}",
    *COMMON,
  ]
  if mesh == "fsdp":
    command.append(f"--mesh={FSDP_MESH.get(devices, f'fsdp:{devices}')}")
  if remat:
    command.append("--config.model.remat=True")
  return command


def plan(args):
  yes_no = {"no": False, "yes": True}
  return [
    cell_command(size, devices, mesh, yes_no[remat], args.per_device_batch)
    for size in map(int, args.sizes.split(","))
    for devices in map(int, args.devices.split(","))
    for mesh in args.meshes.split(",")
    for remat in args.remat.split(",")
  ]


def measure(command):
  """The rows `command` prints, each carrying the command and when it was measured."""
  print("+", " ".join(command), file=sys.stderr, flush=True)
  start = time.perf_counter()
  out = subprocess.run(
    [os.path.join(ROOT, command[0]), *command[1:]],
    check=True,
    capture_output=True,
    text=True,
    cwd=ROOT,
  ).stdout
  rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
  when, wall = time.strftime("%Y-%m-%d %H:%M"), round(time.perf_counter() - start)
  return [dict(r, command=" ".join(command), measured=when, wall_s=wall) for r in rows]


def gib(value):
  return "" if value is None else f"{value:.2f}"


def render(rows):
  """The section: the table, what its columns mean, and the raw rows."""
  order = lambda r: (r["image_shape"][0], r["num_devices"], r["mesh"] != "data", r["remat"])
  rows = sorted(rows, key=order)
  body = []
  for r in rows:
    autoencoder = sum(
      r[k] for k in ("per_device_parameter_gib", "per_device_optimizer_gib", "per_device_ema_gib")
    )
    adversary = sum(
      r.get(k, 0.0)
      for k in (
        "per_device_adversary_parameter_gib",
        "per_device_adversary_optimizer_gib",
        "per_device_adversary_stats_gib",
      )
    )
    per_example = r.get("per_device_activation_gib_per_example")
    body.append(
      [
        r["image_shape"][0],
        r["num_devices"],
        r["mesh"],
        r["remat"],
        r["batch_size"] // r["num_devices"],
        f"{r['parameters'] / 1e6:.1f}M",
        f"{r.get('adversary_parameters', 0) / 1e6:.2f}M",
        round(r["flops_per_example"] / 1e9),
        f"{autoencoder:.3f}",
        f"{adversary:.4f}",
        gib(r.get("per_device_argument_gib")),
        gib(r.get("per_device_temp_gib")),
        gib(None if per_example is None else per_example * r["num_devices"]),
        r.get("largest_batch_per_device", ""),
        r["compile_s"],
        r["measured"],
        f"`{r['command']}`",
      ]
    )
  header = [
    "px",
    "devices",
    "mesh",
    "remat",
    "batch/dev",
    "autoencoder params",
    "discriminator params",
    "GFLOP/example",
    "AE params+Adam+EMA GiB/dev",
    "D params+Adam+stats GiB/dev",
    "arguments GiB/dev",
    "temp GiB/dev",
    "GiB/dev per extra example",
    "largest batch/dev in 80 GB",
    "compile s",
    "measured",
    "command",
  ]
  device = rows[0]["device_kind"] if rows else "cpu"
  return [
    f"{HEADING} (configs/imagenet256_kl_f8.py, both players, `flaxvae bench --aot`)",
    "",
    f"_Written by `.venv/bin/python benchmarks/aot_autoencoder.py` from compiles on simulated "
    f"{device} devices; `measured` dates each row._",
    "",
    *sections.table(header, body),
    "",
    "Shapes only: nothing runs. LDM's kl-f8 (channels 128, multipliers 1,2,4,4) with its "
    "3-layer PatchGAN (BatchNorm) and LPIPS (VGG16, an argument of the step, replicated), "
    "bfloat16 compute with float32 parameters and Adam states for both players, the "
    "autoencoder's EMA kept. Parameters, optimizer and EMA bytes per device are exact, from "
    "the state's shapes and shardings (fsdp splits them; the data axis does not). "
    "GFLOP/example: one two-player step (both backward passes and updates, the "
    "discriminator's branch included) from XLA's cost analysis of the lowered one-device "
    "program. Arguments and temp are XLA:CPU's memory analysis of the compiled step (a GPU's "
    "compiler fuses and lays out differently: read them as an estimate). The largest batch "
    "per device extrapolates arguments + temp linearly from two compiles, at the batch "
    "shown and twice it: (80 GiB - fixed) / (GiB per extra example).",
    "",
    *sections.raw_block(rows),
  ]


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--sizes", default="256,512,1024")
  parser.add_argument("--devices", default="8,64")
  parser.add_argument("--meshes", default="data,fsdp")
  parser.add_argument("--remat", default="no,yes")
  parser.add_argument("--per_device_batch", type=int, default=1)
  parser.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
  parser.add_argument("--fresh", action="store_true", help="measure kept cells again")
  parser.add_argument("--render_only", action="store_true", help="measure nothing")
  args = parser.parse_args()
  rows = sections.raw_rows(sections.read(args.out, HEADING))
  for command in [] if args.render_only else plan(args):
    shown = " ".join(command)
    if any(r["command"] == shown for r in rows) and not args.fresh:
      continue
    try:
      fresh = measure(command)
    except subprocess.CalledProcessError as e:
      print(f"failed ({e.returncode}): {e.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
      continue
    rows = [r for r in rows if r["command"] != shown] + fresh
    sections.write(args.out, HEADING, render(rows))  # after each cell: a stop keeps them
  sections.write(args.out, HEADING, render(rows))
  print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
  main()
