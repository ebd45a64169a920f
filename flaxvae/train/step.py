"""The train step, written once per device with collectives over the `data` axis, and the one
builder of the jitted train function that the trainer, `flaxvae bench` and the tests all run.

`runtime/parallel.py` runs the per-device functions under `jax.shard_map` or `jax.pmap`;
nothing here knows which. The model enters as an NNX graphdef, split once, and the step is a
pure function of the state pytree; the model is seen only through its contract
(models/contract.py), so any model trains here.

Randomness does not depend on the device count: at step s each device draws the noise of the
whole global batch from fold_in(rng, s) and keeps its own rows. The redundant draws are tiny
next to the step, one RNG call per layer instead of one per example, and the same seed and
global batch give the same numbers on 1 device or 8, with either backend.
"""
import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flaxvae.data import protocols
from flaxvae.objectives import bounds
from flaxvae.runtime import parallel
from flaxvae.runtime.parallel import AXIS
from flaxvae.train import guards


class TrainState(NamedTuple):
  step: jax.Array  # int32 scalar: updates attempted so far
  params: Any  # pure dict of float32 arrays (nnx.to_pure_dict of the model state)
  opt_state: Any
  ema_params: Any  # same tree as params when config.ema_decay > 0, else ()
  rng: jax.Array  # raw uint32 PRNG key data, so checkpoints hold plain arrays
  skipped: jax.Array  # int32: steps skipped for non-finite loss/gradients, in total
  consecutive_skips: jax.Array  # int32: skipped in a row up to now
  guard: Any = ()  # guards.py: recent gradient norms when optimizer.adaptive_skip > 0


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The static settings the step closes over (hashable): the objective and the guards."""
  protocol: protocols.Protocol
  objective: str = "elbo"
  num_samples: int = 1
  beta: float = 1.0
  kl_warmup_steps: int = 0
  free_bits: float = 0.0
  free_bits_per: str = "unit"
  ema_decay: float = 0.0
  skip_nonfinite: bool = True
  skip_threshold: float = 0.0
  adaptive_skip: float = 0.0
  adaptive_skip_quantile: float = 0.9


def step_config(config):
  """StepConfig from the resolved config: objective.* and optimizer.* keys of the same names."""
  names = {f.name for f in dataclasses.fields(StepConfig)}
  values = {k: v for part in (config.objective, config.optimizer) for k, v in part.items()
            if k in names}
  values["objective"] = config.objective.name
  return StepConfig(protocol=protocols.PROTOCOLS.get(config.data.protocol),
                    ema_decay=config.ema_decay, **values)


class GlobalBatchNoise:
  """Draws noise for the whole global batch from one key and keeps this device's rows."""

  def __init__(self, key, local_batch, num_samples):
    self.key, self.local_batch, self.num_samples = key, local_batch, num_samples
    self.first = jax.lax.axis_index(AXIS) * local_batch
    self.global_batch = local_batch * jax.lax.axis_size(AXIS)

  def _rows(self, draw, stream, shape, axis):
    full = draw(jax.random.fold_in(self.key, stream), shape)
    return jax.lax.dynamic_slice_in_dim(full, self.first, self.local_batch, axis)

  def uniform(self, event_shape):
    return self._rows(jax.random.uniform, 0, (self.global_batch, *event_shape), 0)

  def normal(self, layer, shape):
    return self._rows(jax.random.normal, 1 + layer,
                      (self.num_samples, self.global_batch, *shape), 1)


def train_step(graphdef, tx, cfg: StepConfig, state: TrainState, images):
  """One optimizer update from this device's slice of the global batch."""
  noise = GlobalBatchNoise(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step),
                           images.shape[0], cfg.num_samples)
  uniform = noise.uniform(images.shape[1:]) if cfg.protocol.dynamic else None
  x = protocols.train_targets(images, uniform, cfg.protocol)
  kl_scale = bounds.kl_weight(state.step, cfg.beta, cfg.kl_warmup_steps)

  def loss_fn(params):
    terms = nnx.merge(graphdef, params).terms(x, noise)
    values = bounds.per_example(terms, cfg.objective, kl_scale, cfg.free_bits, cfg.free_bits_per,
                                axis_name=AXIS)
    return jnp.mean(values["loss"]), values

  (_, values), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = bounds.device_mean(grads, AXIS)
  metrics = bounds.device_mean({k: jnp.mean(v, axis=0) for k, v in values.items()}, AXIS)
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


def build_train_fn(runner: parallel.Runner, graphdef, tx, cfg: StepConfig, unroll: int,
                   inputs="indices"):
  """The jitted train function, state donated: the only place it is assembled.

  inputs "indices": (state, dataset, indices [n, batch]) gathering on device (in-memory feed);
  "batches": (state, uint8 batches [n, batch, H, W, C]) (streaming feed);
  "one_step": (state, uint8 batch [batch, H, W, C]), one step without a loop (cost analysis).
  Returns (state, metrics averaged over the dispatch's steps).
  """
  R, batch = parallel.REPLICATED, parallel.batch_axis
  if inputs == "indices":
    fn, kinds = functools.partial(gather_train_steps, graphdef, tx, cfg, unroll), (R, batch(1))
  elif inputs == "batches":
    fn, kinds = functools.partial(train_steps, graphdef, tx, cfg, unroll), (batch(1),)
  elif inputs == "one_step":
    fn, kinds = functools.partial(train_step, graphdef, tx, cfg), (batch(0),)
  else:
    raise ValueError(f"unknown inputs {inputs!r}: use indices, batches or one_step")
  return runner.wrap(fn, (R, *kinds), (R, R), donate_argnums=(0,))
