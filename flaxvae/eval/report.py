"""`flaxvae report`: PNG plots of a run's evaluations over training steps.

Periodic evaluations (few examples, small K) are drawn as lines with bands of
+-2 standard errors; the final evaluation (whole split, large K) as separate
markers, since its estimators are tighter (log p(x) higher, the mutual
information cap log N larger).
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from flaxvae.errors import ConfigError
from flaxvae.train import outputs

PANELS = {
  "elbo_and_log_px": (
    "ELBO and log p(x) (nats)",
    [("elbo", "ELBO"), ("log_px", "log p(x) (IWAE)")],
  ),
  "kl_to_prior_and_posterior": (
    "KL of q(z|x) to the prior and to the posterior (nats)",
    [
      ("rate", "KL(q(z|x) || p(z))  rate"),
      ("inference_gap", "KL(q(z|x) || p(z|x))  inference gap"),
    ],
  ),
  "elbo_surgery": (
    "ELBO surgery: rate = I(x;z) + KL(q(z) || p(z)) (nats)",
    [
      ("mutual_info", "mutual information I(x;z)"),
      ("marginal_kl", "marginal KL(q(z) || p(z))"),
      ("mutual_info_max", "log N (cap on I)"),
    ],
  ),
  "active_units": ("Active units (Cov_x E_q[z] > 0.01)", [("active_units", "active units")]),
}
LAYER_PANELS = {  # one line per latent layer (top layer first)
  "rate_by_layer": ("KL to the prior by latent layer (nats)", "rate_by_layer"),
  "active_units_by_layer": ("Active units by latent layer", "active_units_by_layer"),
}


def evaluation_rows(workdir):
  """(periodic rows, final rows) with diagnostics, from metrics.jsonl and eval.json."""
  rows = [r for r in outputs.read_metrics(workdir) if r.get("split") != "train" and "log_px" in r]
  periodic = [r for r in rows if not r.get("final")]
  final = [r for r in rows if r.get("final")]
  extra = outputs.read_json(os.path.join(workdir, "eval.json"), "the final evaluation") or {}
  if "log_px" in extra and all(r["step"] != extra.get("step") for r in final):
    final.append(extra)
  if not periodic and not final:
    raise ConfigError(
      f"no evaluations in {workdir}: train with eval.every_steps > 0, "
      "or run flaxvae evaluate --workdir DIR first"
    )
  return periodic, final


def _plot(ax, rows, key, label, color, final, count_key="num_examples"):
  rows = [r for r in rows if key in r and "step" in r]
  if not rows:
    return
  steps = np.array([r["step"] for r in rows])
  values = np.array([r[key] for r in rows])
  errors = np.array([r.get(key + "_stderr", 0.0) for r in rows])
  if final:
    ax.errorbar(
      steps,
      values,
      yerr=2 * errors,
      fmt="D",
      color=color,
      capsize=3,
      label=f"{label}, final (K={rows[-1].get('num_importance_samples')}, "
      f"N={rows[-1].get(count_key)})",
    )
  else:
    ax.plot(steps, values, "-o", ms=3, color=color, label=label)
    ax.fill_between(steps, values - 2 * errors, values + 2 * errors, color=color, alpha=0.2)


def _step_axis(ax, rows):
  """A log step axis (linear through 0) when the evaluations span decades, as a log-spaced
  schedule's do: on a linear axis its early evaluations, where q moves most, overlap at 0."""
  steps = [r["step"] for r in rows if r.get("step", 0) > 0]
  if steps and max(steps) >= 100 * min(steps):
    ax.set_xscale("symlog", linthresh=1)


def make_report(workdir):
  """Writes one PNG per panel into workdir/report/; returns their paths."""
  periodic, final = evaluation_rows(workdir)
  out_dir = os.path.join(workdir, "report")
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for name, (title, series) in PANELS.items():
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, (key, label) in enumerate(series):
      color = f"C{i}"
      _plot(ax, periodic, key, label, color, final=False)
      _plot(ax, final, key, label, color, final=True)
    if name == "kl_to_prior_and_posterior":
      for key, color in (("amortization_gap", "C2"), ("approximation_gap", "C3")):
        _plot(ax, final, key, key.replace("_", " "), color, True, "amortization_examples")
      ax.set_yscale("symlog", linthresh=1)  # gaps from 1,000 nats at step 0 down to a few
    _step_axis(ax, periodic + final)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, f"{name}.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)
  for name, (title, key) in LAYER_PANELS.items():
    paths.append(_layer_panel(out_dir, name, title, key, periodic, final))
  return paths


def _layer_panel(out_dir, name, title, key, periodic, final):
  """Each layer's figure over training (lines) and at the final evaluation (markers)."""
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  rows = [r for r in periodic if isinstance(r.get(key), list)]
  depth = max(
    [len(r[key]) for r in rows + [f for f in final if isinstance(f.get(key), list)]], default=0
  )
  for layer in range(depth):
    color = f"C{layer % 10}"
    label = "top layer" if layer == 0 else f"layer {layer + 1} from the top"
    points = [(r["step"], r[key][layer]) for r in rows if len(r[key]) > layer]
    if points:
      ax.plot(*zip(*points), "-o", ms=3, color=color, label=label if depth <= 12 else None)
    ends = [
      (r["step"], r[key][layer])
      for r in final
      if isinstance(r.get(key), list) and len(r[key]) > layer
    ]
    if ends:
      ax.plot(*zip(*ends), "D", color=color)
  _step_axis(ax, periodic + final)
  ax.set_title(title + ("" if depth <= 12 else f" ({depth} layers)"), fontsize=10)
  ax.set_xlabel("training step")
  ax.grid(alpha=0.3)
  if depth and depth <= 12:
    ax.legend(fontsize=7)
  fig.tight_layout()
  path = os.path.join(out_dir, f"{name}.png")
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
