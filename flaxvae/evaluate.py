"""Evaluation over a split, spread over all devices: per-example figures, then means and errors."""
import math

import jax
import numpy as np

from flaxvae import losses, parallel, step as step_lib


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

  def per_example(self, name, fn, params, rng, num_examples=None):
    n = len(self.images) if not num_examples else min(num_examples, len(self.images))
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
      images, ids = self.runner.put((self.images[ids], ids), parallel.batch_axis(0))
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
