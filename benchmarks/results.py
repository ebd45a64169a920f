"""The experiments behind RESULTS.md: run them (resumable), then write the tables.

    .venv/bin/python benchmarks/results.py run burda     # Burda et al. (2016), Table 1 in structure
    .venv/bin/python benchmarks/results.py run cremer    # Cremer et al. (2018) gap decomposition
    .venv/bin/python benchmarks/results.py run quality   # equal wall time: MLP, conv, VDVAE
    .venv/bin/python benchmarks/results.py write         # RESULTS.md from the runs' eval.json

Every row is one `flaxvae train` command (printed in RESULTS.md beside its figures), run into
runs/results/<table>/<row>; a row whose eval.json exists is not run again. The budgets are
shortened against the papers so everything fits a 2-core CPU; RESULTS.md says how.
"""
import json
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.environ.get("RESULTS_DIR", os.path.join(ROOT, "runs", "results"))
FLAXVAE = [sys.executable, "-m", "flaxvae.cli"]

# Burda et al.: 1 and 2 stochastic layers, VAE and IWAE objectives, k in {1, 5, 50}.
BURDA_EVAL = ["--config.eval.final_num_examples=2000", "--config.eval.log_px_estimator=ais",
              "--config.eval.ais_examples=200", "--config.eval.amortization_examples=0",
              "--config.eval.every_steps=0", "--config.num_steps=4000"]
BURDA = {}
for layers, arg in (("1", ":1"), ("2", "")):
  for k in (1, 5, 50):
    for objective in (("elbo", "iwae") if k > 1 else ("elbo",)):
      BURDA[f"{objective}_k{k}_{layers}layer"] = [
          "train", "--config", f"configs/fashion_mnist_2layer.py{arg}",
          f"--config.objective.name={objective}", f"--config.objective.num_samples={k}",
          *BURDA_EVAL]

# Cremer et al.: the gaps of a Gaussian and an IAF posterior, and of a larger encoder.
CREMER_EVAL = ["--config.data.protocol=static_binarized", "--config.eval.schedule=every",
               "--config.eval.every_steps=0", "--config.eval.final_num_examples=1000",
               "--config.eval.log_px_estimator=ais", "--config.eval.ais_examples=100",
               "--config.eval.amortization_examples=100", "--config.num_steps=4000"]
CREMER = {
    "gaussian": ["train", "--config", "configs/fashion_mnist_mlp.py", *CREMER_EVAL],
    "iaf": ["train", "--config", "configs/fashion_mnist_mlp.py", "--config.model.posterior=iaf",
            *CREMER_EVAL],
    "gaussian_larger_encoder": ["train", "--config", "configs/fashion_mnist_mlp.py",
                                "--config.model.encoder_hidden=(1000,1000)", *CREMER_EVAL],
}

# Equal wall time (30 minutes of training each) on the binarized and the 8-bit protocols.
QUALITY_EVAL = ["--config.time_budget_s=1800", "--config.num_steps=100000000",
                "--config.optimizer.schedule=warmup_constant", "--config.eval.schedule=every",
                "--config.eval.num_examples=500", "--config.eval.num_importance_samples=50",
                "--config.eval.final_num_examples=1000",
                "--config.eval.final_num_importance_samples=200",
                "--config.eval.amortization_examples=0", "--config.checkpoint.every_steps=0"]
EIGHT_BIT = ["--config.data.protocol=8bit", "--config.objective.likelihood=mixture_logistic",
             "--config.objective.num_mixtures=5"]
QUALITY = {
    "mlp": ["train", "--config", "configs/fashion_mnist_mlp.py", *QUALITY_EVAL,
            "--config.eval.every_steps=20000"],
    "conv": ["train", "--config", "configs/fashion_mnist_conv.py", *QUALITY_EVAL,
             "--config.data.protocol=binarized", "--config.eval.every_steps=2000",
             "--config.log_every_steps=200"],
    "vdvae": ["train", "--config", "configs/fashion_mnist_vdvae.py", *QUALITY_EVAL,
              "--config.eval.every_steps=1000", "--config.log_every_steps=100"],
    "conv_8bit": ["train", "--config", "configs/fashion_mnist_conv.py", *QUALITY_EVAL,
                  *EIGHT_BIT, "--config.eval.every_steps=2000", "--config.log_every_steps=200"],
    "vdvae_8bit": ["train", "--config", "configs/fashion_mnist_vdvae_8bit.py", *QUALITY_EVAL,
                   "--config.eval.every_steps=1000", "--config.log_every_steps=100"],
}
TABLES = {"burda": BURDA, "cremer": CREMER, "quality": QUALITY}


def workdir(table, row):
  return os.path.join(RUNS, table, row)


def command(table, row):
  args = TABLES[table][row]
  return ["flaxvae", *args[:1], "--workdir", f"runs/results/{table}/{row}", *args[1:]]


def run(table, rows=None):
  for row, args in TABLES[table].items():
    if rows and row not in rows:
      continue
    out = workdir(table, row)
    if os.path.exists(os.path.join(out, "eval.json")):
      print(f"{table}/{row}: done", flush=True)
      continue
    print("+", shlex.join(command(table, row)), flush=True)
    subprocess.run([*FLAXVAE, args[0], "--workdir", out, *args[1:]], check=True, cwd=ROOT)


def read(table, row):
  path = os.path.join(workdir(table, row), "eval.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def fmt(row, key, digits=2):
  if row is None or key not in row:
    return "n/a"
  err = row.get(key + "_stderr")
  return f"{row[key]:.{digits}f}" + (f" ± {err:.{digits}f}" if err is not None else "")


def burda_table():
  lines = ["| layers | objective | k | NLL, IWAE K=5000 (2,000 images) | NLL, AIS (200 images) | "
           "test ELBO | active units | command |", "|---|---|---|---|---|---|---|---|"]
  for layers in ("1", "2"):
    for objective in ("elbo", "iwae"):
      for k in (1, 5, 50):
        name = f"{'elbo' if k == 1 else objective}_k{k}_{layers}layer"
        row = read("burda", name)
        nll_iwae = None if row is None else -row["log_px_iwae"]
        lines.append(
            f"| {layers} | {'VAE' if objective == 'elbo' else 'IWAE'} | {k} | "
            f"{'n/a' if nll_iwae is None else f'{nll_iwae:.2f}'} | {fmt(row, 'nll')} | "
            f"{fmt(row, 'elbo')} | "
            f"{'n/a' if row is None else row['active_units_by_layer']} | "
            f"`{shlex.join(command('burda', name))}` |")
  return "\n".join(lines)


def cremer_table():
  lines = ["| posterior | log p(x) (AIS) | ELBO of q (amortized) | ELBO of q* (optimised) | "
           "approximation gap | amortization gap | inference gap | command |",
           "|---|---|---|---|---|---|---|---|"]
  for name in CREMER:
    row = read("cremer", name)
    elbo_amortized = None if row is None else row["log_px"] - row["inference_gap"]
    lines.append(
        f"| {name.replace('_', ' ')} | {fmt(row, 'log_px')} | "
        f"{'n/a' if elbo_amortized is None else f'{elbo_amortized:.2f}'} | "
        f"{fmt(row, 'elbo_optimized')} | {fmt(row, 'approximation_gap')} | "
        f"{fmt(row, 'amortization_gap')} | {fmt(row, 'inference_gap')} | "
        f"`{shlex.join(command('cremer', name))}` |")
  return "\n".join(lines)


def quality_table():
  lines = ["| model | protocol | steps in 30 min | NLL (IWAE K=200, 1,000 images) | bits/dim | "
           "test ELBO (1,000) | active units by layer | command |",
           "|---|---|---|---|---|---|---|---|"]
  for name in QUALITY:
    row = read("quality", name)
    lines.append(
        f"| {name.split('_')[0]} | {'8bit' if '8bit' in name else 'binarized'} | "
        f"{'n/a' if row is None else row['step']} | {fmt(row, 'nll')} | "
        f"{fmt(row, 'bits_per_dim', 4)} | {fmt(row, 'elbo')} | "
        f"{'n/a' if row is None else row['active_units_by_layer']} | "
        f"`{shlex.join(command('quality', name))}` |")
  return "\n".join(lines)


def main():
  if len(sys.argv) >= 3 and sys.argv[1] == "run":
    run(sys.argv[2], sys.argv[3:])
  elif sys.argv[1:] == ["write"]:
    print(burda_table())
    print(cremer_table())
    print(quality_table())
  else:
    raise SystemExit(__doc__)


if __name__ == "__main__":
  main()
