"""Runs every benchmark in one invocation and writes BENCHMARKS.md (`make bench` calls this).

    .venv/bin/python benchmarks/report.py [--out BENCHMARKS.md] [--train_steps 6000]

1. the shared peer harness (../shared/bench/peer_vae.py): torch, flax_jit, flax_scan;
2. `flaxvae train` on the default MLP config, steady-state examples/s read from its
   metrics.jsonl (windows after the first, which includes compilation);
3. `flaxvae bench` on the MLP and conv configs (step timings, FLOPs, MFU, dispatch, scaling);
4. the PyTorch twin of the conv VAE (benchmarks/torch_conv_vae.py) in .venv-torch.
Ratios are the point: absolute figures move with machine load.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER = os.environ.get("PEER_HARNESS", os.path.join(ROOT, "..", "shared", "bench", "peer_vae.py"))
PY = os.path.join(ROOT, ".venv", "bin", "python")
TORCH_PY = os.path.join(ROOT, ".venv-torch", "bin", "python")
FLAXVAE = os.path.join(ROOT, ".venv", "bin", "flaxvae")


def json_lines(cmd, env=None):
  print("+", " ".join(cmd), file=sys.stderr, flush=True)
  out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, **(env or {}))).stdout
  return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def trainer_throughput(steps):
  """Steady-state examples/s of a real `flaxvae train` run, from its metrics.jsonl."""
  workdir = tempfile.mkdtemp(prefix="flaxvae-bench-")
  start = time.perf_counter()
  subprocess.run([FLAXVAE, "train", "--config", "configs/fashion_mnist_mlp.py", "--workdir",
                  workdir, f"--config.num_steps={steps}", "--config.eval.every_steps=0",
                  "--config.eval.final_num_importance_samples=10"],
                 check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
  wall = time.perf_counter() - start
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  train_rows = [r for r in rows if r["split"] == "train"]
  rates = [r["examples_per_s"] for r in train_rows[1:]] or [train_rows[0]["examples_per_s"]]
  steps_per_row = train_rows[0]["step"]
  train_s = sum(steps_per_row * 128 / r["examples_per_s"] for r in train_rows)
  return dict(examples_per_s=statistics.median(rates), window_rates=[round(r) for r in rates],
              steps=steps, train_phase_s=train_s, process_wall_s=wall, workdir=workdir)


def table(header, rows):
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
  parser.add_argument("--train_steps", type=int, default=6000)
  parser.add_argument("--peer_epochs", type=int, default=3)
  args = parser.parse_args()

  peers = {}
  for impl in ("torch", "flax_jit", "flax_scan"):
    python = TORCH_PY if impl == "torch" else PY
    peers[impl] = json_lines([python, PEER, impl, "--epochs", str(args.peer_epochs)])[0]
  trainer = trainer_throughput(args.train_steps)
  mlp = json_lines([FLAXVAE, "bench", "--config", "configs/fashion_mnist_mlp.py"])
  conv = json_lines([FLAXVAE, "bench", "--config", "configs/fashion_mnist_conv.py",
                     "--cases", "default,dispatch", "--windows", "3"])
  torch_conv = json_lines([TORCH_PY, "benchmarks/torch_conv_vae.py"])[0]

  scan, torch_mlp = peers["flax_scan"]["examples_per_s"], peers["torch"]["examples_per_s"]
  t = trainer["examples_per_s"]
  mlp_default = next(r for r in mlp if r["case"] == "default")
  conv_default = next(r for r in conv if r["case"] == "default")
  compute_s = trainer["steps"] * 128 / mlp_default["examples_per_s"]
  md = [
      "# Benchmarks", "",
      f"Written by `make bench` (benchmarks/report.py) on {time.strftime('%Y-%m-%d %H:%M')}, "
      f"{mlp_default['device_kind']} x{os.cpu_count()} cores, jax {mlp_default['jax']}. "
      "All figures come from this one invocation; compare ratios, not absolute numbers.", "",
      "## MLP VAE (784-400-20, batch 128): the trainer against the peers", "",
      table(["implementation", "examples/s", "flaxvae train / it"],
            [["`flaxvae train` (metrics.jsonl, windows after the first)", round(t), "1.00"]] +
            [[f"peer {k}", v["examples_per_s"], f"{t / v['examples_per_s']:.2f}"]
             for k, v in peers.items()]), "",
      f"- trainer / flax_scan = **{t / scan:.2f}** (goal >= 0.95); "
      f"trainer / torch = **{t / torch_mlp:.2f}** (goal >= 2).",
      f"- training phase of a {trainer['steps']}-step run: {trainer['train_phase_s']:.1f} s "
      f"wall (sum of log windows) against {compute_s:.1f} s of pure compute at the bench's "
      f"steady-state rate; the whole process took {trainer['process_wall_s']:.1f} s.", "",
      "## Conv VAE (configs/fashion_mnist_conv.py) against its PyTorch twin", "",
      table(["implementation", "examples/s", "ratio"],
            [["flaxvae (bench, default case)", conv_default["examples_per_s"],
              f"{conv_default['examples_per_s'] / torch_conv['examples_per_s']:.2f}"],
             ["torch (benchmarks/torch_conv_vae.py)", torch_conv["examples_per_s"], "1.00"],
             ["FLOP limit (XLA cost / matmul peak)", conv_default["limit_examples_per_s"],
              f"{conv_default['limit_examples_per_s'] / torch_conv['examples_per_s']:.2f}"]]), "",
      "## Every bench case", "",
      table(["model", "case", "devices", "steps/dispatch", "unroll", "compile s", "step ms",
             "examples/s", "MFLOP/example", "MFU", "all-reduce ms", "overhead vs 1 device"],
            [[r["model"], r["case"], r["num_devices"], r["steps_per_dispatch"], r["scan_unroll"],
              r["compile_s"], r["step_ms"], r["examples_per_s"],
              round(r["flops_per_example"] / 1e6, 2), r["mfu"], r.get("allreduce_ms", ""),
              r.get("overhead_vs_1_device", "")] for r in mlp + conv]), "",
      "Simulated devices share the same two cores, so the scaling rows measure the cost of "
      "partitioning and collectives, not a speed-up.", "",
      "## Raw results", "", "```json",
      *[json.dumps(x) for x in [*peers.values(), dict(trainer, impl="flaxvae_train"), *mlp,
                                *conv, torch_conv]], "```", ""]
  with open(args.out, "w") as f:
    f.write("\n".join(md))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
