"""Evaluation over a split, spread over all devices: per-example figures, then means and errors.

`periodic_evaluation` (during training) and `final_evaluation` (end of training,
`flaxvae evaluate`) return one flat row: each figure in nats with its standard
error over examples (`<name>_stderr`), as `diagnostics.py` defines them.
"""
import json
import math
import os
import time

import jax
import numpy as np

from flaxvae import diagnostics, losses, parallel, step as step_lib
from flaxvae.errors import ConfigError


class Evaluator:
  """Runs per-example functions over (a prefix of) a split held on the host.

  `fn(params, rng, images, example_ids) -> {name: [batch]}` is written per device;
  the evaluator pads the last batch, drops the padding and returns numpy arrays.
  """

  def __init__(self, runner: parallel.Runner, images, batch_size):
    self.runner, self.images = runner, images
    per_device = max(1, math.ceil(batch_size / runner.num_devices))
    self.batch_size = per_device * runner.num_devices
    self._compiled = {}

  def per_example(self, name, fn, params, rng, num_examples=None, rows=None):
    """fn over the first `num_examples` (all if None) of the split, or of `rows` if given."""
    source = self.images if rows is None else rows
    n = len(source) if not num_examples else min(num_examples, len(source))
    if name not in self._compiled:
      self._compiled[name] = self.runner.wrap(
          fn, (parallel.REPLICATED, parallel.REPLICATED, parallel.batch_axis(0),
               parallel.batch_axis(0)), (parallel.batch_axis(0),))
    compiled = self._compiled[name]
    params, rng = self.runner.put((params, rng))
    outputs = []
    local = self.batch_size // jax.process_count()
    for start in range(0, n, self.batch_size):
      ids = np.arange(start, start + self.batch_size)
      ids = np.where(ids < n, ids, 0).astype(np.int32)
      ids = ids[jax.process_index() * local:(jax.process_index() + 1) * local]
      images, ids = self.runner.put((source[ids], ids), parallel.batch_axis(0))
      outputs.append(compiled(params, rng, images, ids))
    outputs = [self.runner.gather(o) for o in outputs]
    return jax.tree.map(lambda *xs: np.concatenate(xs)[:n], *outputs)


def summarize(values: dict, num_dims=None):
  """Mean and standard error over examples of each figure; bits/dim of the ELBO if given."""
  out = {}
  for key, v in values.items():
    v = np.asarray(v, np.float64)
    out[key] = float(v.mean())
    out[key + "_stderr"] = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0
  if num_dims and "elbo" in out:
    out["elbo_bits_per_dim"] = float(losses.bits_per_dim(-out["elbo"], num_dims))
  return out


def elbo_fn(graphdef, step_cfg):
  """The per-device function for ELBO, rate and distortion per example (one sample each)."""
  def fn(params, rng, images, ids):
    terms = step_lib.eval_terms(graphdef, step_cfg, params, rng, images, ids)
    return {k: terms[k] for k in ("elbo", "rate", "distortion")}
  return fn


# ----------------------------------------------------------------------------
# Posterior diagnostics: log p(x), inference gap, ELBO surgery, amortization gap
# ----------------------------------------------------------------------------
def check_config(eval_config):
  """ConfigError for eval settings that cannot work, before training starts."""
  for key in ("batch_size", "num_importance_samples", "final_num_importance_samples"):
    if eval_config[key] <= 0:
      raise ConfigError(f"eval.{key} must be positive, got {eval_config[key]}")
  for key in ("num_examples", "final_num_examples", "amortization_examples", "amortization_steps"):
    if eval_config[key] < 0:
      raise ConfigError(f"eval.{key} must be >= 0 (0: {'all' if 'num_' in key else 'off'}), "
                        f"got {eval_config[key]}")
  if eval_config.amortization_learning_rate <= 0:
    raise ConfigError("eval.amortization_learning_rate must be positive, "
                      f"got {eval_config.amortization_learning_rate}")


def eval_rng(config):
  """The key evaluation draws from: examples are keyed by id, so any subset scores the same."""
  return jax.random.key_data(jax.random.key(config.seed + 1))


def diagnose(run, evaluator, params, rng, num_examples, num_importance_samples,
             amortization_examples=0, amortization_steps=0, amortization_learning_rate=1e-2):
  """Every diagnostic over the first `num_examples` (None: all) of the evaluator's split."""
  start = time.perf_counter()
  k = num_importance_samples
  values = evaluator.per_example(
      f"importance_{k}", diagnostics.importance_fn(run.graphdef, run.step_cfg, k),
      params, rng, num_examples)
  means, logvars = values.pop("mean"), values.pop("logvar")
  values.update(evaluator.per_example(
      "aggregate", diagnostics.aggregate_fn(), (means, logvars), rng,
      rows=np.stack([means, logvars], axis=1)))
  num_dims = int(np.prod(run.image_shape))
  discrete = run.likelihood.discrete
  row = summarize(values, num_dims if discrete else None)
  nll = -np.asarray(values["log_px"], np.float64)
  row.update(summarize({"nll": nll}))
  if discrete:
    row["bits_per_dim"] = float(losses.bits_per_dim(row["nll"], num_dims))
    row["bits_per_dim_stderr"] = float(losses.bits_per_dim(row["nll_stderr"], num_dims))
  row["active_units"], row["active_units_stderr"] = diagnostics.active_units(means)
  row.update(num_examples=len(nll), num_importance_samples=k,
             mutual_info_max=math.log(len(nll)))
  if amortization_examples and amortization_steps:
    fn = diagnostics.amortization_fn(run.graphdef, run.step_cfg, amortization_steps,
                                     amortization_learning_rate,
                                     num_eval_samples=min(k, 1000))
    gaps = evaluator.per_example(f"amortization_{amortization_steps}", fn, params, rng,
                                 amortization_examples)
    m = len(gaps["elbo_optimized"])
    row.update(summarize({
        "amortization_gap": gaps["elbo_optimized"] - gaps["elbo_encoder"],
        "approximation_gap": values["log_px"][:m] - gaps["elbo_optimized"]}))
    row["amortization_examples"] = m
  row["seconds"] = time.perf_counter() - start
  return row


def periodic_evaluation(run, evaluator, params, rng):
  """The cheaper evaluation run every config.eval.every_steps."""
  c = run.config.eval
  return diagnose(run, evaluator, params, rng, c.num_examples or None, c.num_importance_samples)


def final_evaluation(run, evaluator, params, rng, num_examples=None, num_importance_samples=None):
  """The full evaluation: config.eval.final_* (whole split, K = 5000) and the amortization gap."""
  c = run.config.eval
  return diagnose(run, evaluator, params, rng, num_examples or c.final_num_examples or None,
                  num_importance_samples or c.final_num_importance_samples,
                  c.amortization_examples, c.amortization_steps, c.amortization_learning_rate)


def write_eval_json(workdir, row):
  from flaxvae import outputs
  path = os.path.join(workdir, "eval.json")
  if not outputs.is_writer():
    return path
  with open(path, "w") as f:
    json.dump(row, f, indent=2, sort_keys=True)
  return path


def format_table(row):
  """A plain-text table of the figures (mean +- standard error) in `row`."""
  lines = []
  for key, value in row.items():
    if key.endswith("_stderr") or not isinstance(value, (int, float)):
      continue
    err = row.get(key + "_stderr")
    text = f"{value:12.4f} +- {err:.4f}" if err is not None else f"{value:12.4f}"
    lines.append(f"{key:<26}{text}")
  return "\n".join(lines)


def evaluate_workdir(workdir, split=None, num_importance_samples=None, max_examples=None,
                     step=None):
  """`flaxvae evaluate`: the final evaluation of a checkpoint, written to workdir/eval.json."""
  from flaxvae import api, data as data_lib
  if num_importance_samples is not None and num_importance_samples <= 0:
    raise ConfigError(f"--num_importance_samples must be positive, got {num_importance_samples}")
  if max_examples is not None and max_examples < 0:
    raise ConfigError(f"--max_examples must be >= 0 (0: the whole split), got {max_examples}")
  model = api.load(workdir, step)
  run, config = model.run, model.run.config
  split = split or config.data.eval_split
  images = (run.eval_images if split == config.data.eval_split
            else data_lib.load_images(config.data, split))
  evaluator = Evaluator(run.runner, images, config.eval.batch_size)
  row = final_evaluation(run, evaluator, model.params, eval_rng(config), max_examples,
                         num_importance_samples)
  row = dict(row, step=model.step, split=split)
  write_eval_json(workdir, row)
  return row
