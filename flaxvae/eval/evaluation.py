"""The evaluation of a model over a split: one flat row of figures with standard errors.

`periodic_evaluation` (during training) and `final_evaluation` (end of training,
`flaxvae evaluate`) return one row: each figure in nats with its standard error over examples
(`<name>_stderr`), as diagnostics.py defines them. Per-layer figures come as lists, top layer
first (`rate_by_layer`, `active_units_by_layer`). After the importance pass come the optional
diagnostics of evaluators.py, by name; those the model cannot give (it lacks the capability)
are skipped and named under `skipped`, never reported as zero.

Whether log p(x) is a log-likelihood depends on the protocol and the likelihood
(data/protocols.py): only then are `nll` and `bits_per_dim` reported; otherwise the row says
`is_probability_model: false` and what the figures are instead.
"""

import json
import math
import os
import time

import jax
import numpy as np

from flaxvae.data import protocols
from flaxvae.eval import diagnostics
from flaxvae.eval.evaluators import EVALUATORS
from flaxvae.objectives import bounds, estimators
from flaxvae.runtime import backend

FINAL_FILE = "eval.json"


def summarize(values: dict):
  """Mean and standard error over examples of each figure ([N] or [N, L] arrays)."""
  out = {}
  for key, v in values.items():
    v = np.asarray(v, np.float64)
    mean = v.mean(axis=0)
    err = v.std(axis=0, ddof=1) / math.sqrt(len(v)) if len(v) > 1 else np.zeros_like(mean)
    out[key], out[key + "_stderr"] = (
      (mean.tolist(), err.tolist()) if v.ndim > 1 else (float(mean), float(err))
    )
  return out


def eval_rng(seed):
  """The key evaluation draws from (`seed`: the run's): examples are keyed by id, so any subset
  scores the same."""
  return jax.random.key_data(jax.random.key(seed + 1))


def likelihood_note(protocol, likelihood):
  """What log p(x) is under this protocol and likelihood, when it is not a log-likelihood."""
  if likelihood.data_kind == "continuous":
    return (
      f"the {likelihood.name} likelihood is a density, not a probability mass of the "
      "data: log_px and elbo are log-density bounds, not comparable with likelihoods"
    )
  return (
    f"the {likelihood.name} likelihood is not a probability model of {protocol.name} "
    f"data: log_px and elbo are bounds on a pseudo-likelihood (for Bernoulli on grey "
    "levels: minus the binary cross-entropy the PyTorch example reports), not "
    "log-likelihoods; use data.protocol="
    f"{'binarized' if likelihood.data_kind == 'binary' else '8bit'} for one"
  )


def diagnose(
  run,
  evaluator,
  params,
  rng,
  num_examples,
  num_importance_samples,
  final=False,
  progress=False,
  eval_settings=None,
):
  """Every diagnostic the model supports over the first `num_examples` (None: all).

  The importance pass, then the optional diagnostics (evaluators.EVALUATORS) in their order.
  `final` adds what the eval settings keep for the final evaluation: log p(x) by the chosen
  estimator (AIS replaces IWAE's figures where it ran; IWAE's stay as *_iwae), BDMC on
  simulated data, and the amortization gap. `eval_settings` (settings.EvalSettings) defaults
  to the run's.
  """
  eval_settings = eval_settings or run.settings.eval
  start = time.perf_counter()
  k, protocol = num_importance_samples, run.protocol
  label = (lambda what: f"{what}:") if progress else (lambda what: None)
  values = importance_values(
    run, evaluator, params, rng, num_examples, k, label(f"log p(x), K={k}")
  )
  q_means = [values.pop(f"q_mean_{i}") for i in range(len(run.model.latent_shapes))]
  khat = values.pop("khat")
  n, skipped, fields = len(values["log_px"]), {}, {}
  for name, evaluate in EVALUATORS.items():
    found = evaluate(
      run=run,
      evaluator=evaluator,
      params=params,
      rng=rng,
      values=values,
      num_examples=num_examples,
      num_importance_samples=k,
      final=final,
      label=label,
      eval_settings=eval_settings,
    )
    if isinstance(found, str):
      skipped[name] = found
      continue
    skipped.update(found.pop("skipped", {}))  # what part of a diagnostic could not give, and why
    for key, value in found.items():
      (values if isinstance(value, np.ndarray) else fields)[key] = value
  row = summarize({k_: v for k_, v in values.items() if len(v) == n})
  row["log_px_estimator"] = "iwae"
  log_px = np.asarray(values["log_px"], np.float64)
  num_dims = int(np.prod(run.image_shape))
  row["elbo_bits_per_dim"] = float(bounds.bits_per_dim(-row["elbo"], num_dims))
  row["protocol"], row["likelihood"] = protocol.name, run.likelihood.name
  row["is_probability_model"] = protocols.is_probability_model(protocol, run.likelihood)
  if row["is_probability_model"]:
    row.update(summarize({"nll": -log_px}))
    row["bits_per_dim"] = float(bounds.bits_per_dim(row["nll"], num_dims))
    row["bits_per_dim_stderr"] = float(bounds.bits_per_dim(row["nll_stderr"], num_dims))
  else:
    del row["elbo_bits_per_dim"]
    row["note"] = likelihood_note(protocol, run.likelihood)
  if k >= estimators.PSIS_MIN_SAMPLES:
    # inf: a tail too degenerate to fit (estimators.psis_khat), counted as unreliable
    finite = khat[np.isfinite(khat)]
    if finite.size:
      row["khat_mean"] = float(np.mean(finite))
    row["khat_above_0_7"] = float(np.mean(khat > diagnostics.UNRELIABLE_KHAT))
    row["khat_degenerate"] = float(np.mean(~np.isfinite(khat)))
  else:
    skipped["khat"] = f"needs at least {estimators.PSIS_MIN_SAMPLES} importance samples"
  by_layer = [diagnostics.active_units(m) for m in q_means]
  row["active_units_by_layer"] = [count for count, _ in by_layer]
  row["active_units"] = sum(count for count, _ in by_layer)
  row["active_units_stderr"] = float(math.sqrt(sum(e**2 for _, e in by_layer)))
  row.update(num_examples=n, num_importance_samples=k)
  row.update(summarize({k_: v for k_, v in values.items() if len(v) != n}))  # over fewer examples
  row.update(fields)
  if skipped:
    row["skipped"] = {
      name: (f"model {run.settings.model.name!r} {why}" if "capability" in why else why)
      for name, why in skipped.items()
    }
  row["seconds"] = time.perf_counter() - start
  return row


def importance_values(run, evaluator, params, rng, num_examples, k, progress):
  """Per-example importance figures (diagnostics.importance_fn). Where the backend wants it
  (runtime/backend.py: convolutional models on XLA:CPU), chunks of samples are dispatched from
  the host instead of scanned on the device: the same draws and figures."""
  rows = backend.host_chunk_rows(run.settings.model.name)
  if rows is None:
    return evaluator.per_example(
      f"importance_{k}",
      diagnostics.importance_fn(run.graphdef, run.protocol, k),
      params,
      rng,
      num_examples,
      progress=progress,
    )
  per_device = evaluator.batch_for(num_examples) // evaluator.runner.num_devices
  chunk = max(1, min(k, rows // per_device))
  num_chunks = -(-k // chunk)
  # jit of the functions themselves (not of a new partial each call): cached across evaluations
  start = jax.jit(diagnostics.first_chunk, static_argnames="num_samples")
  merge = jax.jit(diagnostics.merge_chunk, donate_argnums=0)

  def fold(total, part, chunk_index):
    if total is None:
      return start(part, num_samples=num_chunks * chunk)
    return merge(total, part, chunk_index * chunk)

  def reduce(total):
    out = dict(total, log_w=total["log_w"].T)  # back to [samples, batch]
    khat = np.asarray(jax.jit(estimators.psis_khat)(out["log_w"][:k]))
    return {
      key: np.asarray(v)
      for key, v in diagnostics.importance_row(diagnostics.finish(out, k), khat).items()
    }

  return evaluator.per_example(
    f"importance_{k}_chunks",
    diagnostics.importance_chunk_fn(run.graphdef, run.protocol, k, chunk),
    params,
    rng,
    num_examples,
    progress=progress,
    chunks=num_chunks,
    fold=fold,
    reduce=reduce,
  )


def periodic_evaluation(run, evaluator, params, rng):
  """The cheaper evaluation run every eval.every_steps."""
  c = run.settings.eval
  return diagnose(run, evaluator, params, rng, c.num_examples or None, c.num_importance_samples)


def final_settings(eval_settings, num_examples=None, num_importance_samples=None):
  """(examples (None: all), K) of the final evaluation (`eval_settings`:
  settings.EvalSettings), or of an ad-hoc one that names them."""
  c = eval_settings
  if num_examples is None:
    num_examples = c.final_num_examples
  return num_examples or None, num_importance_samples or c.final_num_importance_samples


def final_evaluation(run, evaluator, params, rng, settings=None, eval_settings=None):
  """The full evaluation: eval.final_* (whole split, K = 5000) and the amortization gap.

  `settings` (examples or None for all, K), as `final_settings` resolves them, overrides the
  eval settings'; `eval_settings` (settings.EvalSettings) replaces the run's."""
  eval_settings = eval_settings or run.settings.eval
  n, k = settings or final_settings(eval_settings)
  return diagnose(
    run, evaluator, params, rng, n, k, final=True, progress=True, eval_settings=eval_settings
  )


def result_file(eval_settings, eval_split, split, num_examples, num_importance_samples):
  """eval.json for the run's own final evaluation (of `eval_settings` on `eval_split`);
  eval_<split>_K<k>_N<n>.json otherwise, so an ad-hoc evaluation never replaces the one
  `report` and `make run` rely on."""
  final_n, final_k = final_settings(eval_settings)
  if split == eval_split and num_importance_samples == final_k and num_examples == final_n:
    return FINAL_FILE
  return f"eval_{split}_K{num_importance_samples}_N{num_examples or 'all'}.json"


def write_json(workdir, name, row):
  path = os.path.join(workdir, name)
  if jax.process_index() == 0:
    with open(path, "w") as f:
      json.dump(row, f, indent=2, sort_keys=True)
  return path


def format_table(row):
  """A plain-text table of the figures (mean +- standard error) in `row`."""
  lines = []
  for key, value in row.items():
    if key.endswith("_stderr") or isinstance(value, bool):
      continue
    err = row.get(key + "_stderr")
    if isinstance(value, (int, float)):
      text = f"{value:12.4f} +- {err:.4f}" if err is not None else f"{value:12.4f}"
    elif isinstance(value, list):
      text = "[" + ", ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in value) + "]"
    else:
      continue
    lines.append(f"{key:<26}{text}")
  return "\n".join(lines)
