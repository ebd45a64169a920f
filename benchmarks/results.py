"""The experiments behind RESULTS.md: run them (resumable), then write the tables.

    .venv/bin/python benchmarks/results.py run burda     # Burda et al. (2016), Table 1 in structure
    .venv/bin/python benchmarks/results.py run cremer    # Cremer et al. (2018) gap decomposition
    .venv/bin/python benchmarks/results.py run quality   # equal wall time: MLP, conv, VDVAE
    .venv/bin/python benchmarks/results.py run checks  # AIS, IWAE, BDMC against quadrature
    .venv/bin/python benchmarks/results.py run equal_examples  # conv, as many examples as the VDVAE
    .venv/bin/python benchmarks/results.py write         # RESULTS.md from the runs' eval.json

Every row is one `flaxvae train` command (printed in RESULTS.md beside its figures), run into
runs/results/<table>/<row>; a row that has a record (below) or an eval.json is not run again
(delete benchmarks/records/<table>/<row>.json and the run dir to run it again). The budgets are
shortened against the papers so everything fits a 2-core CPU; RESULTS.md says how.

runs/ is scratch (not in git, gone with the machine), so what the tables and figures need of each
finished row is kept in benchmarks/records/<table>/<row>.json, in git: `run` and `write` refresh
a record from its run dir when the run dir is there, and `write` reads the record when it is not.
A fresh checkout therefore writes the same RESULTS.md, and a row run on another day joins it.
"""

import json
import os
import shlex
import subprocess
import sys

from flaxvae.eval import report
from flaxvae.train import outputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.environ.get("RESULTS_DIR", os.path.join(ROOT, "runs", "results"))
RECORDS = os.path.join(ROOT, "benchmarks", "records")
FLAXVAE = [sys.executable, "-m", "flaxvae.cli"]

# Burda et al.: 1 and 2 stochastic layers, VAE and IWAE objectives, k in {1, 5, 50}.
BURDA_EVAL = [
  "--config.eval.final_num_examples=2000",
  "--config.eval.log_px_estimator=ais",
  "--config.eval.ais_examples=200",
  "--config.eval.amortization_examples=0",
  "--config.eval.every_steps=0",
  "--config.num_steps=4000",
]
BURDA = {}
for layers, arg in (("1", ":1"), ("2", "")):
  for k in (1, 5, 50):
    for objective in ("elbo", "iwae") if k > 1 else ("elbo",):
      BURDA[f"{objective}_k{k}_{layers}layer"] = [
        "train",
        "--config",
        f"configs/fashion_mnist_2layer.py{arg}",
        f"--config.objective.name={objective}",
        f"--config.objective.num_samples={k}",
        *BURDA_EVAL,
      ]

# Cremer et al.: the gaps of a Gaussian and an IAF posterior, and of a larger encoder.
CREMER_EVAL = [
  "--config.data.protocol=static_binarized",
  "--config.eval.schedule=every",
  "--config.eval.every_steps=0",
  "--config.eval.final_num_examples=1000",
  "--config.eval.log_px_estimator=ais",
  "--config.eval.ais_examples=100",
  "--config.eval.amortization_examples=100",
  "--config.num_steps=4000",
]
CREMER = {
  "gaussian": ["train", "--config", "configs/fashion_mnist_mlp.py", *CREMER_EVAL],
  "iaf": [
    "train",
    "--config",
    "configs/fashion_mnist_mlp.py",
    "--config.model.posterior=iaf",
    *CREMER_EVAL,
  ],
  "gaussian_larger_encoder": [
    "train",
    "--config",
    "configs/fashion_mnist_mlp.py",
    "--config.model.encoder_hidden=(1000,1000)",
    *CREMER_EVAL,
  ],
}

# Equal wall time (30 minutes of training each, evaluations inside the budget) on the binarized
# and the 8-bit protocols. `run quality` gives every row one core of its own (taskset) and runs
# as many rows at once as there are cores: the same conditions for every row, in half the time
# on this 2-core machine. The final K is 100, not 5000, so the VDVAE's final pass fits too.
QUALITY_BUDGET_S = 1800
QUALITY_PERIODIC_EXAMPLES, QUALITY_PERIODIC_K = 200, 50
QUALITY_FINAL_EXAMPLES, QUALITY_FINAL_K = 1000, 100
QUALITY_EVAL = [
  f"--config.time_budget_s={QUALITY_BUDGET_S}",
  "--config.num_steps=100000000",
  "--config.optimizer.schedule=warmup_constant",
  "--config.eval.schedule=every",
  f"--config.eval.num_examples={QUALITY_PERIODIC_EXAMPLES}",
  f"--config.eval.num_importance_samples={QUALITY_PERIODIC_K}",
  f"--config.eval.final_num_examples={QUALITY_FINAL_EXAMPLES}",
  f"--config.eval.final_num_importance_samples={QUALITY_FINAL_K}",
  "--config.eval.amortization_examples=0",
  "--config.checkpoint.every_steps=0",
]
EIGHT_BIT = [
  "--config.data.protocol=8bit",
  "--config.objective.likelihood=mixture_logistic",
  "--config.objective.num_mixtures=5",
]
# The VDVAE makes few steps in 30 minutes on one core (RESULTS.md has how many): its config's
# 2,000-step KL warm-up would leave it under-weighting the KL for most of the budget (a row run
# with it stopped inside it), so these rows warm up over 500 steps.
VDVAE_BUDGET = [
  "--config.objective.kl_warmup_steps=500",
  "--config.eval.every_steps=500",
  "--config.log_every_steps=100",
]
QUALITY = {
  "mlp": [
    "train",
    "--config",
    "configs/fashion_mnist_mlp.py",
    *QUALITY_EVAL,
    "--config.eval.every_steps=20000",
  ],
  "conv": [
    "train",
    "--config",
    "configs/fashion_mnist_conv.py",
    *QUALITY_EVAL,
    "--config.data.protocol=binarized",
    "--config.eval.every_steps=2000",
    "--config.log_every_steps=200",
  ],
  "vdvae": ["train", "--config", "configs/fashion_mnist_vdvae.py", *QUALITY_EVAL, *VDVAE_BUDGET],
  "conv_8bit": [
    "train",
    "--config",
    "configs/fashion_mnist_conv.py",
    *QUALITY_EVAL,
    *EIGHT_BIT,
    "--config.eval.every_steps=2000",
    "--config.log_every_steps=200",
  ],
  "vdvae_8bit": [
    "train",
    "--config",
    "configs/fashion_mnist_vdvae_8bit.py",
    *QUALITY_EVAL,
    *VDVAE_BUDGET,
  ],
}
QUALITY_COLORS = {"mlp": "C0", "conv": "C1", "vdvae": "C2"}
# Why the VDVAE loses at equal wall time: the conv VAE trained on only as many examples as the
# VDVAE saw in its 30 minutes (1,900 steps of 64 binarized, 1,800 of 64 8-bit; conv's batch is
# 128), with the same constant schedule and final evaluation.
EQUAL_EXAMPLES = {
  "conv_binarized": [
    "train",
    "--config",
    "configs/fashion_mnist_conv.py",
    *QUALITY_EVAL[2:],
    "--config.data.protocol=binarized",
    "--config.eval.every_steps=0",
    "--config.num_steps=950",
  ],
  "conv_8bit": [
    "train",
    "--config",
    "configs/fashion_mnist_conv.py",
    *QUALITY_EVAL[2:],
    *EIGHT_BIT,
    "--config.eval.every_steps=0",
    "--config.num_steps=900",
  ],
}
# Estimators against known answers: log p(x) of the 2-D-latent model by quadrature
# beside AIS and IWAE (benchmarks/quadrature_2d.py, which also runs the estimators), and on the
# default 20-D model AIS, IWAE and the BDMC sandwich of log p(x) on data simulated from it;
# then that model's decoder frozen and a fresh encoder trained alone (the seed question).
CHECKS = {
  "quadrature_2d": [
    "train",
    "--config",
    "configs/fashion_mnist_mlp.py",
    "--config.model.latent_dim=2",
    "--config.num_steps=1500",
    "--config.eval.final_num_examples=1000",
    "--config.eval.amortization_examples=0",
  ],
  "estimators_20d": [
    "train",
    "--config",
    "configs/fashion_mnist_mlp.py",
    "--config.eval.final_num_examples=2000",
    "--config.eval.log_px_estimator=ais",
    "--config.eval.ais_examples=200",
    "--config.eval.bdmc_examples=100",
    "--config.eval.amortization_examples=0",
  ],
  # The seed question as an experiment: estimators_20d's decoder frozen, a fresh encoder.
  "encoder_only": [
    "train",
    "--config",
    "configs/fashion_mnist_encoder_only.py:runs/results/checks/estimators_20d",
  ],
}
QUADRATURE = [
  "benchmarks/quadrature_2d.py",
  "--workdir",
  "runs/results/checks/quadrature_2d",
  "--images",
  "12",
]
TABLES = {
  "burda": BURDA,
  "cremer": CREMER,
  "quality": QUALITY,
  "checks": CHECKS,
  "equal_examples": EQUAL_EXAMPLES,
}


def workdir(table, row):
  return os.path.join(RUNS, table, row)


def command(table, row):
  args = TABLES[table][row]
  return ["flaxvae", *args[:1], "--workdir", f"runs/results/{table}/{row}", *args[1:]]


def shown_command(table, row):
  """The command beside a row's figures: the one its record was run with (a row run before a
  budget changed keeps its own), else the one `run` would run."""
  rec = record(table, row)
  return rec["command"] if rec else shlex.join(command(table, row))


# Where the rows in RESULTS.md ran: not all in one sitting, so say which core each row had.
QUALITY_PLACEMENT = (
  "Where each row ran on this 2-core machine: the binarized MLP and conv rows on 2026-12-02 "
  "(conv alone on core 1; the MLP on core 0, which it shared with a VDVAE run since "
  "replaced, so the MLP row had less than a core); both VDVAE rows on 2026-12-03, side by "
  "side, one core each; conv 8bit on 2026-12-03 on core 0 while core 1 ran Burda rows. "
  "`results.py run quality` gives every row a core of its own (taskset)."
)
PINNED_TABLES = ("quality",)  # rows compared at equal wall time: one core each, side by side


def run(table, rows=None):
  todo = []
  for row, args in TABLES[table].items():
    if rows and row not in rows:
      continue
    out = workdir(table, row)
    if read(table, row) is not None:
      print(f"{table}/{row}: done", flush=True)
      continue
    todo.append([*FLAXVAE, args[0], "--workdir", out, *args[1:]])
  if table in PINNED_TABLES:
    run_pinned(todo, sorted(os.sched_getaffinity(0)))
  else:
    for argv in todo:
      print("+", shlex.join(argv), flush=True)
      subprocess.run(argv, check=True, cwd=ROOT)
  if table == "checks" and (not rows or "quadrature_2d" in rows):
    path = os.path.join(workdir("checks", "quadrature_2d"), "quadrature.jsonl")
    if not os.path.exists(path):
      print("+", shlex.join(QUADRATURE), flush=True)
      lines = subprocess.run(
        [sys.executable, *QUADRATURE], check=True, cwd=ROOT, capture_output=True, text=True
      ).stdout
      with open(path + ".tmp", "w") as f:
        f.write(lines)
      os.replace(path + ".tmp", path)  # a stopped pass leaves no half-written answer
  for row in TABLES[table]:
    record(table, row)


def run_pinned(todo, cores):
  """Runs the commands `todo`, each pinned to one core of `cores`, len(cores) at a time."""
  running, failed = {}, []
  while todo or running:
    while todo and len(running) < len(cores):
      core = next(c for c in cores if c not in running)
      argv = ["taskset", "-c", str(core), *todo.pop(0)]
      print("+", shlex.join(argv), flush=True)
      running[core] = subprocess.Popen(argv, cwd=ROOT)
    pid, status = os.wait()
    core = next(c for c, proc in running.items() if proc.pid == pid)
    proc = running.pop(core)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by os.wait, not by proc
    if proc.returncode:
      failed.append(shlex.join(proc.args))
  if failed:
    raise SystemExit("failed (rerun `results.py run` to retry only these): " + "; ".join(failed))


def snapshot(table, row):
  """What RESULTS.md needs of a finished run dir: eval.json, the evaluations in metrics.jsonl
  (periodic ones with the wall minutes they ran at) and the quadrature answers; None if the row
  has not finished here."""
  out = workdir(table, row)
  path = os.path.join(out, "eval.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    snap = {"command": shlex.join(command(table, row)), "eval": json.load(f)}
  periodic, final = report.evaluation_rows(out)
  minutes = wall_minutes(out, [r["step"] for r in periodic])
  snap["periodic"] = [dict(r, wall_minutes=m) for r, m in zip(periodic, minutes)]
  snap["final"] = final
  quadrature = os.path.join(out, "quadrature.jsonl")
  if os.path.exists(quadrature):
    with open(quadrature) as f:
      snap["quadrature"] = [json.loads(line) for line in f if line.startswith("{")]
  return snap


def record(table, row):
  """The row's record: refreshed from its run dir when that is here, else the one in git."""
  path = os.path.join(RECORDS, table, row + ".json")
  snap = snapshot(table, row)
  if snap is not None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump(snap, f, indent=1)
      f.write("\n")
    os.replace(path + ".tmp", path)
    return snap
  return stored_record(table, row)


def stored_record(table, row):
  """The row's record as git keeps it, or None; never writes (what tests read)."""
  path = os.path.join(RECORDS, table, row + ".json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def read(table, row):
  rec = record(table, row)
  return None if rec is None else rec["eval"]


def fmt(row, key, digits=2):
  if row is None or key not in row:
    return "n/a"
  err = row.get(key + "_stderr")
  return f"{row[key]:.{digits}f}" + (f" ± {err:.{digits}f}" if err is not None else "")


def burda_table():
  lines = [
    "| layers | objective | k | NLL, IWAE K=5000 (2,000 images) | NLL, AIS (200 images) | "
    "test ELBO | active units | command |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for layers in ("1", "2"):
    for objective in ("elbo", "iwae"):
      for k in (1, 5, 50) if objective == "elbo" else (5, 50):  # at k=1 IWAE is the VAE
        name = f"{objective}_k{k}_{layers}layer"
        row = read("burda", name)
        nll_iwae = None if row is None else -row["log_px_iwae"]
        lines.append(
          f"| {layers} | {'VAE' if objective == 'elbo' else 'IWAE'} | {k} | "
          f"{'n/a' if nll_iwae is None else f'{nll_iwae:.2f}'} | {fmt(row, 'nll')} | "
          f"{fmt(row, 'elbo')} | "
          f"{'n/a' if row is None else row['active_units_by_layer']} | "
          f"`{shown_command('burda', name)}` |"
        )
  return "\n".join(lines)


def cremer_table():
  lines = [
    "| posterior | log p(x) (AIS) | ELBO of q (amortized) | ELBO of q* (optimised) | "
    "approximation gap | amortization gap | inference gap | command |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for name in CREMER:
    row = read("cremer", name)
    elbo_amortized = (
      None if row is None else row.get("elbo_amortized", row["log_px"] - row["inference_gap"])
    )
    lines.append(
      f"| {name.replace('_', ' ')} | {fmt(row, 'log_px')} | "
      f"{'n/a' if elbo_amortized is None else f'{elbo_amortized:.2f}'} | "
      f"{fmt(row, 'elbo_optimized')} | {fmt(row, 'approximation_gap')} | "
      f"{fmt(row, 'amortization_gap')} | {fmt(row, 'inference_gap')} | "
      f"`{shown_command('cremer', name)}` |"
    )
  return "\n".join(lines)


def quality_table():
  lines = [
    f"| model | protocol | steps in 30 min | NLL (IWAE K={QUALITY_FINAL_K}, "
    f"{QUALITY_FINAL_EXAMPLES:,} images) | bits/dim | test ELBO ({QUALITY_FINAL_EXAMPLES:,}) "
    "| active units by layer | command |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for name in QUALITY:
    row = read("quality", name)
    lines.append(
      f"| {name.split('_')[0]} | {'8bit' if '8bit' in name else 'binarized'} | "
      f"{'n/a' if row is None else row['step']} | {fmt(row, 'nll')} | "
      f"{fmt(row, 'bits_per_dim', 4)} | {fmt(row, 'elbo')} | "
      f"{'n/a' if row is None else row['active_units_by_layer']} | "
      f"`{shown_command('quality', name)}` |"
    )
  return "\n".join(lines)


def equal_examples_table():
  """The VDVAE rows beside conv trained on as many examples as the VDVAE saw."""
  lines = [
    "| protocol | model | steps x batch = examples | NLL (nats) | bits/dim | test ELBO | command |",
    "|---|---|---|---|---|---|---|",
  ]
  for protocol, conv_name, vdvae_name in (
    ("binarized", "conv_binarized", "vdvae"),
    ("8bit", "conv_8bit", "vdvae_8bit"),
  ):
    for model, row, command_text in (
      ("vdvae (30 minutes)", read("quality", vdvae_name), shown_command("quality", vdvae_name)),
      ("conv", read("equal_examples", conv_name), shown_command("equal_examples", conv_name)),
    ):
      batch = 64 if model.startswith("vdvae") else 128
      steps = "n/a" if row is None else f"{row['step']:,} x {batch} = {row['step'] * batch:,}"
      lines.append(
        f"| {protocol} | {model} | {steps} | {fmt(row, 'nll')} | "
        f"{fmt(row, 'bits_per_dim', 4)} | {fmt(row, 'elbo')} | `{command_text}` |"
      )
  return "\n".join(lines)


def wall_minutes(workdir, steps):
  """Minutes since train() began at each of `steps`, from the training rows' wall_s (evaluations
  run at log steps; step 0 is the start)."""
  rows = [r for r in outputs.read_metrics(workdir) if r.get("split") == "train" and "wall_s" in r]
  known = {0: 0.0, **{r["step"]: r["wall_s"] / 60 for r in rows}}
  return [known.get(s) for s in steps]


def quality_figure(path):
  """NLL (binarized, nats) and bits/dim (8bit) against wall time: each row's periodic evaluations
  as a line where its record keeps them, and every row's final evaluation as a marker at the end
  of the budget, so a row whose evaluations over time were lost still stands in the comparison."""
  plt = report.plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
  budget_minutes = QUALITY_BUDGET_S / 60
  for ax, eight_bit, key, unit in (
    (axes[0], False, "nll", "NLL, nats"),
    (axes[1], True, "bits_per_dim", "bits/dim"),
  ):
    for name in QUALITY:
      rec = record("quality", name)
      if ("8bit" in name) != eight_bit or rec is None:
        continue
      points = [
        (r["wall_minutes"], r[key])
        for r in rec.get("periodic", [])
        if r.get("wall_minutes") is not None and key in r
      ]
      label = name.split("_")[0]
      color = QUALITY_COLORS[label]  # one colour per model in both panels
      if points:
        ax.plot(*zip(*points), "-o", ms=3, color=color, label=f"{label}: periodic")
      if key in rec.get("eval", {}):
        ax.plot(
          [budget_minutes],
          [rec["eval"][key]],
          "D",
          ms=7,
          color=color,
          mfc="none",
          label=f"{label}: final" + ("" if points else " (curve not kept)"),
        )
    ax.set(
      xlabel="wall time, minutes",
      ylabel=unit,
      title=("binarized" if not eight_bit else "8bit") + " Fashion-MNIST",
    )
    if ax.lines:
      ax.legend(fontsize=8)
  fig.text(
    0.5,
    0.01,
    f"lines: periodic evaluations ({QUALITY_PERIODIC_EXAMPLES} test images, "
    f"K={QUALITY_PERIODIC_K}); diamonds: the final evaluation after the "
    f"{budget_minutes:.0f}-minute budget ({QUALITY_FINAL_EXAMPLES:,} test images, "
    f"K={QUALITY_FINAL_K})",
    ha="center",
    fontsize=8,
  )
  fig.tight_layout(rect=(0, 0.04, 1, 1))
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def quality_figure_note():
  """Which finished rows the figure draws as a final point only: rows recovered from an old
  RESULTS.md keep their final figures but not their evaluations over time."""
  missing = [
    name for name in QUALITY if (rec := record("quality", name)) and not rec.get("periodic")
  ]
  if not missing:
    return "Every finished row is drawn with its evaluations over time."
  return (
    f"{', '.join(missing)}: the final evaluation only (a diamond at "
    f"{QUALITY_BUDGET_S // 60} minutes); their run dirs were lost before records kept the "
    "evaluations over time, so their curves cannot be drawn."
  )


def dominant_gap(row):
  if row is None or "amortization_gap" not in row:
    return "n/a"
  return "amortization" if row["amortization_gap"] > row["approximation_gap"] else "approximation"


def burda_findings():
  """The paper's orderings (more layers help; IWAE k=50 beats VAE k=1), checked on the rows run."""
  nll = {name: -row["log_px_iwae"] for name in BURDA if (row := read("burda", name))}
  out = []
  for k_name in ("elbo_k1", "elbo_k5", "iwae_k5", "iwae_k50"):
    one, two = nll.get(f"{k_name}_1layer"), nll.get(f"{k_name}_2layer")
    if one is not None and two is not None:
      out.append(
        f"- {k_name}: 2 layers {'beat' if two < one else 'do not beat'} 1 layer "
        f"({two:.2f} against {one:.2f} nats by IWAE; the paper: 2 layers better)."
      )
  for layers in ("1", "2"):
    for vae_name, iwae_name in (
      ("elbo_k5", "iwae_k5"),
      ("elbo_k50", "iwae_k50"),
      ("elbo_k1", "iwae_k50"),
    ):
      vae, iwae = nll.get(f"{vae_name}_{layers}layer"), nll.get(f"{iwae_name}_{layers}layer")
      if vae is not None and iwae is not None:
        out.append(
          f"- {layers} layer(s): IWAE k={iwae_name.split('_k')[1]} "
          f"{'beats' if iwae < vae else 'does not beat'} VAE k={vae_name.split('_k')[1]}"
          f" ({iwae:.2f} against {vae:.2f} nats; the paper: IWAE better)."
        )
  missing = [name for name in BURDA if name not in nll]
  if missing:
    out.append(f"- Not run yet: {', '.join(missing)}.")
  return "\n".join(out)


def checks_section():
  lines = []
  rows = (record("checks", "quadrature_2d") or {}).get("quadrature")
  if rows:
    summary, images = rows[-1], rows[:-1]
    lines += [
      "### log p(x) of a 2-D-latent model against quadrature",
      "",
      f"`{shown_command('checks', 'quadrature_2d')}`, then "
      f"`.venv/bin/python {shlex.join(QUADRATURE)}`: log p(x) on a {summary['grid']} grid "
      f"(midpoint rule, float64) against IWAE (K={summary['iwae_samples']}) and AIS "
      f"({summary['ais_chains']} chains, {summary['ais_steps']} steps), on the first "
      f"{summary['images']} test images.",
      "",
      "| image | quadrature | AIS | IWAE |",
      "|---|---|---|---|",
      *[
        f"| {r['image']} | {r['quadrature']:.2f} | {r['ais']:.2f} | {r['iwae']:.2f} |"
        for r in images
      ],
      "",
      f"Mean absolute error: AIS **{summary['mean_abs_error_ais']:.3f}** nats (max "
      f"{summary['max_abs_error_ais']:.2f}), IWAE **{summary['mean_abs_error_iwae']:.3f}** "
      f"(max {summary['max_abs_error_iwae']:.2f}). Seconds: {summary['seconds']}.",
      "",
    ]
  row = read("checks", "estimators_20d")
  if row is not None:
    lines += [
      "### AIS, IWAE and the BDMC sandwich on the default 20-D model",
      "",
      f"`{shown_command('checks', 'estimators_20d')}`",
      "",
      "| estimator | log p(x) | images |",
      "|---|---|---|",
      f"| IWAE, K={row['num_importance_samples']} | {fmt(row, 'log_px_iwae')} | "
      f"{row['num_examples']} test images |",
      f"| AIS, {row.get('ais_chains')} chains x {row.get('ais_steps')} steps | "
      f"{fmt(row, 'log_px')} | {row.get('ais_examples')} test images |",
      f"| BDMC lower (AIS) | {fmt(row, 'bdmc_lower')} | {row.get('bdmc_examples')} simulated |",
      f"| BDMC upper (reverse AIS from an exact posterior sample) | {fmt(row, 'bdmc_upper')} "
      f"| {row.get('bdmc_examples')} simulated |",
      "",
      f"BDMC sandwich width: **{fmt(row, 'bdmc_gap', 3)}** nats; share of test images with "
      f"IWAE's k-hat > 0.7: {row.get('khat_above_0_7', float('nan')):.2f}. The evaluation "
      f"took {row['seconds']:.0f} s in all; the cost per 1,000 images of each estimator is "
      "`make bench`'s eval case (BENCHMARKS.md).",
      "",
    ]
  lines += encoder_only_lines()
  return "\n".join(lines)


def encoder_only_lines():
  rec = record("checks", "encoder_only")
  if rec is None:
    return []
  # what `flaxvae report` plots
  rows = [r for r in rec["periodic"] + rec["final"] if "inference_gap" in r]
  cells = lambda key: " | ".join(f"{r[key]:.2f}" for r in rows)
  return [
    "### The seed question: a frozen decoder, a fresh encoder trained alone",
    "",
    f"`{shown_command('checks', 'encoder_only')}` (the decoder of estimators_20d "
    f"above; evaluations on {rows[0]['num_examples'] if 'num_examples' in rows[0] else 'the'}"
    " test images at log-spaced steps). With p(x) fixed, the ELBO can only rise by "
    "closing KL(q(z|x) || p(z|x)).",
    "",
    "| step | " + " | ".join(f"{r['step']:,}" for r in rows) + " |",
    "|---|" + "---|" * len(rows),
    "| rate, KL(q(z\\|x) \\|\\| p(z)) | " + cells("rate") + " |",
    "| inference gap, KL(q(z\\|x) \\|\\| p(z\\|x)) (IWAE) | " + cells("inference_gap") + " |",
    "| test ELBO | " + cells("elbo") + " |",
    "| log p(x) (IWAE) | " + cells("log_px") + " |",
    "",
  ]


def results_markdown():
  return "\n".join(
    [
      "# Results",
      "",
      "Written by `.venv/bin/python benchmarks/results.py write` from the rows' records "
      "(benchmarks/records, each a finished run's eval.json and evaluations); each "
      "row was run by `benchmarks/results.py run TABLE` (its `flaxvae train` command is beside "
      "its figures) on a 2-core CPU. Rows not run yet read n/a.",
      "",
      "## Burda et al. (2016), Table 1 in structure, on Fashion-MNIST",
      "",
      "`binarized` protocol (dynamic binarization in training, the test set binarized once "
      "with a fixed seed). Shortened against the paper so a row fits this machine: 4,000 steps "
      "of batch 100 (the paper: 3,280 passes over the data), test NLL by IWAE "
      "with K=5000 on 2,000 test images (the paper: all 10,000), AIS on 200.",
      "",
      burda_table(),
      "",
      burda_findings(),
      "",
      "## Cremer, Li & Duvenaud (2018): the inference gap split in two",
      "",
      "`static_binarized` protocol (threshold 0.5, as the paper's Fashion-MNIST). 4,000 steps "
      "(the paper trains to convergence). Every figure is on the same first 100 test images: "
      "log p(x) by AIS (4 chains x 500 steps), the ELBO of the amortized q, and the ELBO of "
      "q*, the posterior's parameters optimised per example; approximation gap = log p(x) - "
      "ELBO(q*), amortization gap = ELBO(q*) - ELBO(q). For the IAF, q* optimises the "
      "Gaussian's mean and logvar and the flow's context vector per example while the flow's "
      "weights stay shared (Cremer et al. optimise the whole flow per example), so its "
      "approximation gap is an upper bound on the family's and its amortization gap a lower "
      "bound.",
      "",
      cremer_table(),
      "",
      *[
        f"- {name.replace('_', ' ')}: the {dominant_gap(read('cremer', name))} gap dominates."
        for name in CREMER
        if read("cremer", name)
      ],
      "",
      "## Equal wall time: 30 minutes of training each",
      "",
      "Each row trains for 30 minutes of wall time (`time_budget_s=1800`, its periodic "
      "evaluations inside the budget) with a constant learning rate after warm-up, then "
      "evaluates the last step's parameters (EMA where the config keeps them). "
      f"{QUALITY_PLACEMENT} Shortened against a paper-style protocol: K={QUALITY_FINAL_K} "
      f"importance samples on the first {QUALITY_FINAL_EXAMPLES:,} test images instead of "
      "K=5000 on all 10,000.",
      "",
      quality_table(),
      "",
      "![NLL against wall time](docs/figures/quality_nll_vs_wall.png)",
      "",
      quality_figure_note(),
      "",
      "### Why the VDVAE loses here: examples seen",
      "",
      "On this CPU the VDVAE's step costs 240 MFLOP per example against the conv VAE's 68 and "
      "runs at a lower MFU (BENCHMARKS.md), so in 30 minutes it sees about a tenth of the "
      "examples. These rows give the conv VAE only as many examples as the VDVAE saw (same "
      "constant schedule, same final evaluation).",
      "",
      equal_examples_table(),
      "",
      "## Estimators against known answers",
      "",
      checks_section() or "Not run yet: `benchmarks/results.py run checks`.",
      "",
    ]
  )


def main():
  if len(sys.argv) >= 3 and sys.argv[1] == "run":
    run(sys.argv[2], sys.argv[3:])
  elif sys.argv[1:] == ["write"]:
    path = os.path.join(ROOT, "RESULTS.md")
    with open(path, "w") as f:
      f.write(results_markdown())
    print(f"wrote {path}")
    print("wrote", quality_figure(os.path.join(ROOT, "docs", "figures", "quality_nll_vs_wall.png")))
  else:
    raise SystemExit(__doc__)


if __name__ == "__main__":
  main()
