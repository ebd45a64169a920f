"""The train step, written once per device with collectives over the `data` axis.

`parallel.py` runs these functions under `jax.shard_map` or `jax.pmap`; nothing
here knows which. The model enters as an NNX graphdef, split once, and the
step is a pure function of the state pytree.

Randomness does not depend on the device count: at step s each device draws
the noise of the whole global batch from fold_in(rng, s) and keeps its own
rows. The redundant draws are tiny (latent noise, and pixels only for dynamic
binarization), one RNG call instead of one per example, and the same seed and
global batch give the same numbers on 1 device or 8, with either backend.
Evaluation keys its noise per example id instead, so any subset reproduces.
"""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flaxvae import guards, losses

AXIS = "data"


class TrainState(NamedTuple):
  step: jax.Array  # int32 scalar: updates attempted so far
  params: Any  # pure dict of float32 arrays (nnx.to_pure_dict of the model state)
  opt_state: Any
  ema_params: Any  # same tree as params when config.ema_decay > 0, else ()
  rng: jax.Array  # raw uint32 PRNG key data, so checkpoints hold plain arrays
  skipped: jax.Array  # int32: steps skipped for non-finite loss/gradients, in total
  consecutive_skips: jax.Array  # int32: skipped in a row up to now
  guard: Any = ()  # guards.py: recent gradient norms when optimizer.adaptive_skip > 0


class StepConfig(NamedTuple):
  """The static settings the step closes over (hashable, from the run config)."""
  likelihood: losses.Likelihood
  objective: str
  num_samples: int
  beta: float
  kl_warmup_steps: int
  free_bits: float
  binarization: str
  ema_decay: float
  skip_nonfinite: bool
  skip_threshold: float = 0.0
  adaptive_skip: float = 0.0
  adaptive_skip_quantile: float = 0.9


def step_config(config, likelihood):
  o, opt = config.objective, config.optimizer
  return StepConfig(likelihood, o.name, o.num_samples, o.beta, o.kl_warmup_steps, o.free_bits,
                    config.data.binarization, config.ema_decay, opt.skip_nonfinite,
                    opt.get("skip_threshold", 0.0), opt.get("adaptive_skip", 0.0),
                    opt.get("adaptive_skip_quantile", 0.9))


def to_unit_range(images_uint8):
  return images_uint8.astype(jnp.float32) / 255.0


def binarize(x, uniform, binarization):
  """Floats in [0,1] -> the model's targets: as they are, Bernoulli draws, or thresholded."""
  if binarization == "dynamic":
    return (uniform < x).astype(jnp.float32)
  if binarization == "static":
    return (x > 0.5).astype(jnp.float32)
  if binarization == "none":
    return x
  raise ValueError(f"unknown data.binarization {binarization!r}: use none, dynamic or static")


def preprocess(images_uint8, keys, binarization):
  """uint8 images -> targets, with dynamic binarization drawn from each example's key."""
  x = to_unit_range(images_uint8)
  uniform = (jax.vmap(lambda k: jax.random.uniform(k, x.shape[1:]))(keys)
             if binarization == "dynamic" else None)
  return binarize(x, uniform, binarization)


def example_noise(keys, num_samples, latent_dim):
  """Posterior noise [k, batch, latent] keyed per example (evaluation)."""
  eps = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), (num_samples, latent_dim)))(keys)
  return jnp.swapaxes(eps, 0, 1)


class GlobalBatchNoise:
  """Draws noise for the whole global batch from one key and keeps this device's rows."""

  def __init__(self, key, local_batch):
    self.key, self.local_batch = key, local_batch
    self.first = jax.lax.axis_index(AXIS) * local_batch
    self.global_batch = local_batch * jax.lax.axis_size(AXIS)

  def _rows(self, draw, stream, shape, axis):
    full = draw(jax.random.fold_in(self.key, stream), shape)
    return jax.lax.dynamic_slice_in_dim(full, self.first, self.local_batch, axis)

  def uniform(self, event_shape):
    return self._rows(jax.random.uniform, 0, (self.global_batch, *event_shape), 0)

  def normal(self, num_samples, latent_dim):
    return self._rows(jax.random.normal, 1, (num_samples, self.global_batch, latent_dim), 1)


def batch_terms(graphdef, params, x, draw_eps, cfg: StepConfig, kl_scale=1.0, axis_name=AXIS):
  """Per-example VAE terms for a batch; `draw_eps(k, latent_dim)` gives the posterior noise."""
  model = nnx.merge(graphdef, params)
  mean, logvar = model.encode(x)
  eps = draw_eps(cfg.num_samples, mean.shape[-1])  # [k, batch, latent]
  return losses.vae_terms(eps, x, mean, logvar, model.decode, cfg.likelihood,
                          objective=cfg.objective, kl_scale=kl_scale, free_bits=cfg.free_bits,
                          axis_name=axis_name)


def train_step(graphdef, tx, cfg: StepConfig, state: TrainState, images):
  """One optimizer update from this device's slice of the global batch."""
  noise = GlobalBatchNoise(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step),
                           images.shape[0])
  x = to_unit_range(images)
  x = binarize(x, noise.uniform(x.shape[1:]) if cfg.binarization == "dynamic" else None,
               cfg.binarization)
  kl_scale = losses.kl_weight(state.step, cfg.beta, cfg.kl_warmup_steps)

  def loss_fn(params):
    terms = batch_terms(graphdef, params, x, noise.normal, cfg, kl_scale)
    return jnp.mean(terms["loss"]), terms

  (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = losses.device_mean(grads, AXIS)
  metrics = losses.device_mean({k: jnp.mean(v) for k, v in terms.items()}, AXIS)
  grad_norm = optax.tree.norm(grads)
  ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
  if guards.enabled(cfg):  # grad_norm is pmean'd: every device takes the same decision
    ok &= grad_norm <= guards.threshold(state.guard, cfg)

  def update(_):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if cfg.ema_decay:
      ema = jax.tree.map(lambda e, p: cfg.ema_decay * e + (1 - cfg.ema_decay) * p, ema, params)
    return params, opt_state, ema

  if cfg.skip_nonfinite or guards.enabled(cfg):
    # A branch, not a select over every array: a skipped step costs nothing, a taken one no copy.
    params, opt_state, ema = jax.lax.cond(
        ok, update, lambda _: (state.params, state.opt_state, state.ema_params), None)
  else:
    params, opt_state, ema = update(None)
  skipped = (~ok).astype(jnp.int32)
  new_state = TrainState(state.step + 1, params, opt_state, ema, state.rng,
                         state.skipped + skipped, (state.consecutive_skips + skipped) * skipped,
                         guards.update(state.guard, grad_norm))
  metrics = dict(metrics, grad_norm=grad_norm, skipped=skipped.astype(jnp.float32))
  return new_state, metrics


def train_steps(graphdef, tx, cfg: StepConfig, unroll: int, state: TrainState, batches,
                batch_of=lambda b: b):
  """`len(batches)` train steps in one lax.scan; returns the mean of each metric.

  `batch_of` turns a scanned item into the step's uint8 images (the identity for
  image batches, a gather for indices). Metrics are summed on device so the host
  only reads them when it logs.
  """
  def body(state, item):
    return train_step(graphdef, tx, cfg, state, batch_of(item))

  # A rolled loop (even of one trip) runs convolutions many times slower on XLA:CPU, so
  # dispatches no longer than `unroll` are unrolled completely: straight-line code, no loop.
  # (lax.scan keeps a one-trip while loop for length 1, so this unrolls by hand.)
  if batches.shape[0] <= unroll:
    rows = []
    for item in batches:
      state, row = body(state, item)
      rows.append(row)
    metrics = jax.tree.map(lambda *m: jnp.stack(m), *rows)
  else:
    state, metrics = jax.lax.scan(body, state, batches, unroll=unroll)
  return state, jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)


def gather_train_steps(graphdef, tx, cfg, unroll, state, dataset, indices):
  """train_steps over batches gathered on device from a device-resident dataset.

  Each step gathers its own batch inside the loop: no [steps, batch, *image] copy.
  """
  return train_steps(graphdef, tx, cfg, unroll, state, indices, lambda idx: dataset[idx])


def eval_terms(graphdef, cfg: StepConfig, params, rng, images, example_ids):
  """Per-example ELBO terms (one posterior sample each), keyed by the examples' ids."""
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.wrap_key_data(rng), i))(example_ids)
  x = preprocess(images, jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys), cfg.binarization)
  return batch_terms(graphdef, params, x, lambda k, d: example_noise(keys, k, d),
                     cfg._replace(objective="elbo", num_samples=1), axis_name=None)
