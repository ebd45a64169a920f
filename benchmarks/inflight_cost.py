"""What the bound on dispatches in flight costs on one device: the default config's trainer,
8,000 steps, with the bound (runtime/dispatch.py's limit of 2) and without it.

    for m in bounded unbounded bounded unbounded bounded unbounded; do
      .venv/bin/python benchmarks/inflight_cost.py $m; done

Prints one JSON line per run: the trainer's median examples/s over its log windows (the first,
with compilation, left out) and the same train function timed by `flaxvae bench` in-process.
Unbounded is safe only on one device (several devices deadlocked: issue 11).
"""

import json
import os
import statistics
import sys
import tempfile

import flaxvae

flaxvae.apply_process_defaults(malloc=True)  # as `flaxvae train` runs, before JAX starts
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("FLAXVAE_DATA_DIR", os.path.join(ROOT, "data", "tfds"))
mode = sys.argv[1]
if mode == "unbounded":  # the trainer as before the fix: no bound on dispatches in flight
  from flaxvae.runtime import dispatch

  dispatch.InFlight.__init__.__defaults__ = (10**9, "a train dispatch")
from flaxvae import bench, defaults
from flaxvae.train import outputs
from flaxvae.train.trainer import train

c = defaults.load_config_file(os.path.join(ROOT, "configs", "fashion_mnist_mlp.py"))
with c.unlocked():
  c.num_steps, c.log_every_steps = 8000, 1000
  c.checkpoint.every_steps = 0
  c.eval.schedule, c.eval.every_steps, c.eval.amortization_examples = "every", 0, 0
  c.eval.final_num_examples, c.eval.final_num_importance_samples = 100, 10
w = tempfile.mkdtemp()
train(c, w)
rows = outputs.read_metrics(w)
rates = [r["examples_per_s"] for r in rows if r["split"] == "train"][1:]
row = bench.time_trainer(c, windows=3)
print(
  json.dumps(
    dict(
      mode=mode,
      trainer=round(statistics.median(rates)),
      windows=[round(r) for r in rates],
      bench_default=round(row["examples_per_s"]),
    )
  )
)
