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

Sharded parameters (FSDP / ZeRO-3, `Layout`): with an fsdp axis each device holds a slice of
every large parameter, of its optimizer state and of its EMA. The step gathers the whole
parameters (all-gather over fsdp), computes the gradient of its rows of the batch, and
reduce-scatters it back to slices (psum_scatter over fsdp, mean over data), so the optimizer
updates only its own slice. The collectives are explicit, in this one per-device function.
Gradient accumulation (`accumulate_steps`) splits each device's rows into microbatches whose
gradients are averaged before the one update: the numbers of the large batch, in less memory.
"""

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flaxvae.data import protocols
from flaxvae.models.noise import NoiseSource
from flaxvae.objectives import bounds
from flaxvae.runtime import backend, parallel
from flaxvae.runtime.parallel import AXIS, FSDP
from flaxvae.train import guards, players


class TrainState(NamedTuple):
  step: jax.Array  # int32 scalar: updates attempted so far
  params: Any  # pure dict of float32 arrays (nnx.to_pure_dict of the model state)
  opt_state: Any
  ema_params: Any  # same tree as params when ema_decay > 0, else ()
  rng: jax.Array  # raw uint32 PRNG key data, so checkpoints hold plain arrays
  skipped: jax.Array  # int32: steps skipped for non-finite loss/gradients, in total
  consecutive_skips: jax.Array  # int32: skipped in a row up to now
  guard: Any = ()  # guards.py: recent gradient norms when optimizer.adaptive_skip > 0
  adversary: Any = ()  # players.AdversaryState when the run trains a discriminator, else ()


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
  grad_clip_norm: float = 0.0
  accumulate_steps: int = 1
  perceptual_weight: float = 0.0
  adversary: Any = None  # players.AdversaryStep when the run trains a discriminator

  @property
  def reconstructs(self):
    """Whether the loss needs the reconstruction itself (perceptual or adversarial terms)."""
    return bool(self.perceptual_weight) or self.adversary is not None


class Layout(NamedTuple):
  """Where the batch and the parameters live: the batch axes, and the fsdp split.

  param_dims: per parameter, the dimension split over the fsdp axis, or -1 (whole on every
  device); runtime/parallel.fsdp_dim decides it from the whole shape.
  """

  batch_axes: Any = AXIS
  fsdp: int = 1
  param_dims: Any = None
  adversary_dims: Any = None  # the discriminator's param_dims

  def gather(self, params):
    """This device's slices -> whole parameters."""
    if self.fsdp == 1:
      return params
    return jax.tree.map(
      lambda p, d: p if d < 0 else jax.lax.all_gather(p, FSDP, axis=d, tiled=True),
      params,
      self.param_dims,
    )

  def reduce(self, grads):
    """Whole per-device gradients -> the mean over every device, sliced as the parameters."""
    if self.fsdp == 1:
      return bounds.device_mean(grads, self.batch_axes)

    def one(g, d):
      if d < 0:
        return bounds.device_mean(g, self.batch_axes)
      g = jax.lax.psum_scatter(g, FSDP, scatter_dimension=d, tiled=True) / self.fsdp
      return bounds.device_mean(g, AXIS)

    return jax.tree.map(one, grads, self.param_dims)

  def norm(self, grads):
    """The global L2 norm of gradients held as slices (each slice counted once)."""
    if self.fsdp == 1:
      return optax.tree.norm(grads)
    split = [g for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(self.param_dims)) if d >= 0]
    whole = [g for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(self.param_dims)) if d < 0]
    squares = lambda gs: sum((jnp.sum(jnp.square(g.astype(jnp.float32))) for g in gs), 0.0)
    return jnp.sqrt(jax.lax.psum(squares(split), FSDP) + squares(whole))


def step_config(s, adversary=None):
  """StepConfig from settings.Settings `s`, every field named: a setting renamed on either side
  fails here, never falls back to StepConfig's default. `adversary`: players.AdversaryStep."""
  o, opt = s.objective, s.optimizer
  return StepConfig(
    protocol=protocols.PROTOCOLS.get(s.data.protocol),
    objective=o.name,
    num_samples=o.num_samples,
    beta=o.beta,
    kl_warmup_steps=o.kl_warmup_steps,
    free_bits=o.free_bits,
    free_bits_per=o.free_bits_per,
    ema_decay=s.ema_decay,
    skip_nonfinite=opt.skip_nonfinite,
    skip_threshold=opt.skip_threshold,
    adaptive_skip=opt.adaptive_skip,
    adaptive_skip_quantile=opt.adaptive_skip_quantile,
    grad_clip_norm=opt.grad_clip_norm,
    accumulate_steps=opt.accumulate_steps,
    perceptual_weight=o.perceptual_weight,
    adversary=adversary,
  )


def consecutive_skips(state: TrainState):
  """The longest current run of skipped steps of any player (the autoencoder's, or the
  discriminator's when the run trains one): what max_consecutive_skips bounds."""
  if not state.adversary:
    return state.consecutive_skips
  return jnp.maximum(state.consecutive_skips, state.adversary.consecutive_skips)


def ema_decay_at(step, decay):
  """The EMA's decay at `step`: min(decay, (1 + step) / (10 + step)), the warm-up of TF's
  ExponentialMovingAverage with num_updates. A fixed 0.999 from the initial parameters keeps
  37% of them after 1,000 steps, so an early or short run would evaluate mostly its
  initialisation, far worse than the parameters it trained."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def train_step(
  graphdef, tx, cfg: StepConfig, layout: Layout, state: TrainState, images, constants=None
):
  """One optimizer update from this device's slice of the global batch (and one of the
  discriminator's, when the run has one: train/players.py). `constants`: the frozen networks'
  weights the loss needs (LPIPS), an argument of the jitted function, never baked into it."""
  noise = NoiseSource.per_global_batch(
    jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step),
    images.shape[0],
    cfg.num_samples,
    layout.batch_axes,
  )
  uniform = noise.uniform(images.shape[1:]) if cfg.protocol.dynamic else None
  x = protocols.train_targets(images, uniform, cfg.protocol)
  kl_scale = bounds.kl_weight(state.step, cfg.beta, cfg.kl_warmup_steps)

  def loss_fn(params, x, noise):
    terms = nnx.merge(graphdef, params).terms(x, noise)
    values = bounds.per_example(
      terms, cfg.objective, kl_scale, cfg.free_bits, cfg.free_bits_per, axis_name=layout.batch_axes
    )
    return jnp.mean(values["loss"]), jax.tree.map(lambda v: jnp.mean(v, axis=0), values)

  whole = layout.gather(state.params)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if cfg.reconstructs:  # LDM's loss: one backward pass with the heads' gradients (players.py)
    grad_fn = lambda whole, x, noise: _as_value_and_grad(
      players.autoencoder_gradients(
        graphdef, cfg, layout, state, whole, x, noise, kl_scale, constants
      )
    )
  if cfg.accumulate_steps == 1:
    (_, values), grads = grad_fn(whole, x, noise)
  else:  # microbatches of this device's rows, averaged: the large batch's gradient
    size = x.shape[0] // cfg.accumulate_steps
    parts = [
      grad_fn(whole, x[m * size : (m + 1) * size], noise.rows(m * size, size))
      for m in range(cfg.accumulate_steps)
    ]
    values, grads = jax.tree.map(lambda *a: sum(a) / len(a), *[(v, g) for (_, v), g in parts])
  reconstruction = values.pop(players.RECONSTRUCTION, None)  # this device's rows, [0, 1]
  grads = layout.reduce(grads)
  metrics = bounds.device_mean(values, layout.batch_axes)
  grad_norm = layout.norm(grads)
  if cfg.grad_clip_norm:  # here, not in optax: the norm of sliced gradients needs the layout
    grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, cfg.grad_clip_norm / grad_norm), grads)
  ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
  if guards.enabled(cfg):  # grad_norm is reduced: every device takes the same decision
    ok &= grad_norm <= guards.threshold(state.guard, cfg)

  def update(_):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if cfg.ema_decay:
      decay = ema_decay_at(state.step, cfg.ema_decay)
      ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
    return params, opt_state, ema

  if cfg.skip_nonfinite or guards.enabled(cfg):
    # A branch, not a select over every array: a skipped step costs nothing, a taken one no copy.
    params, opt_state, ema = jax.lax.cond(
      ok, update, lambda _: (state.params, state.opt_state, state.ema_params), None
    )
  else:
    params, opt_state, ema = update(None)
  skipped = (~ok).astype(jnp.int32)
  adversary = state.adversary
  if cfg.adversary is not None:
    adversary, adversary_metrics = players.discriminator_update(
      cfg.adversary, layout, state, x, reconstruction
    )
    metrics = dict(metrics, **adversary_metrics)
  new_state = TrainState(
    state.step + 1,
    params,
    opt_state,
    ema,
    state.rng,
    state.skipped + skipped,
    (state.consecutive_skips + skipped) * skipped,
    guards.update(state.guard, grad_norm),
    adversary,
  )
  metrics = dict(metrics, grad_norm=grad_norm, skipped=skipped.astype(jnp.float32))
  return new_state, metrics


def _as_value_and_grad(values_and_grads):
  """players' (values, grads) in value_and_grad's ((loss, values), grads) form."""
  values, grads = values_and_grads
  return (values["loss"], values), grads


def train_steps(
  graphdef,
  tx,
  cfg: StepConfig,
  layout: Layout,
  unroll: int,
  state: TrainState,
  batches,
  batch_of=lambda b: b,
  constants=None,
):
  """`len(batches)` train steps in one lax.scan; returns the mean of each metric.

  `batch_of` turns a scanned item into the step's uint8 images (the identity for
  image batches, a gather for indices). Metrics are summed on device so the host
  only reads them when it logs.
  """

  def body(state, item):
    return train_step(graphdef, tx, cfg, layout, state, batch_of(item), constants)

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


def gather_train_steps(graphdef, tx, cfg, layout, unroll, state, dataset, indices, constants=None):
  """train_steps over batches gathered on device from a device-resident dataset.

  Each step gathers its own batch inside the loop: no [steps, batch, *image] copy.
  """
  return train_steps(
    graphdef, tx, cfg, layout, unroll, state, indices, lambda idx: dataset[idx], constants
  )


def layout_of(runner: parallel.Runner, params, adversary_params=None):
  """The Layout of `params` (and the discriminator's) on `runner`'s mesh."""
  dims = lambda tree: jax.tree.map(
    lambda p: -1 if (d := parallel.fsdp_dim(p.shape, runner.fsdp)) is None else d, tree
  )
  adversary_dims = None if adversary_params is None else dims(adversary_params)
  return Layout(runner.batch_axes, runner.fsdp, dims(params), adversary_dims)


class WithConstants:
  """The jitted train function with the frozen networks' weights (LPIPS) bound as its second
  argument: placed on the devices once, passed to every call, never compiled into the program
  as constants. Called and lowered as the function itself."""

  def __init__(self, jitted, constants):
    self.jitted, self.constants = jitted, constants

  def __call__(self, state, *inputs):
    return self.jitted(state, self.constants, *inputs)

  def lower(self, state, *inputs):
    return self.jitted.lower(state, self.constants, *inputs)

  def __getattr__(self, name):
    """The rest of the wrapped function's interface (a compiled one's as_text, cost_analysis,
    memory_analysis: what bench and the op profile read)."""
    if name in ("jitted", "constants"):  # not yet set (copy, pickle): no recursion
      raise AttributeError(name)
    return getattr(self.jitted, name)


def build_train_fn(
  runner: parallel.Runner,
  graphdef,
  tx,
  cfg: StepConfig,
  unroll: int,
  state,
  inputs="indices",
  constants=None,
):
  """The jitted train function, state donated: the only place it is assembled.

  inputs "indices": (state, dataset, indices [n, batch]) gathering on device (in-memory feed);
  "batches": (state, uint8 batches [n, batch, H, W, C]) (streaming feed);
  "one_step": (state, uint8 batch [batch, H, W, C]), one step without a loop (cost analysis).
  `state` (arrays or shapes) gives the layout of the state on the runner's mesh.
  Returns (state, metrics averaged over the dispatch's steps). `constants` (the LPIPS weights,
  host arrays or shapes) are bound as WithConstants, replicated on every device. A run whose
  discriminator starts later gets WithWaitingProgram on XLA:CPU (program_for picks).
  """
  if constants is not None and not _is_abstract(constants):
    constants = runner.put(constants)  # once, shared by both programs of WithWaitingProgram
  full = _build_train_fn(runner, graphdef, tx, cfg, unroll, state, inputs, constants)
  adversary = cfg.adversary
  if adversary is None or adversary.first_active_step <= 0:
    return full
  if not backend.separate_waiting_program():
    return full
  waiting_cfg = dataclasses.replace(cfg, adversary=dataclasses.replace(adversary, waiting=True))
  waiting = _build_train_fn(runner, graphdef, tx, waiting_cfg, unroll, state, inputs, constants)
  return WithWaitingProgram(full, waiting, adversary.first_active_step)


class WithWaitingProgram:
  """The train function of a run whose discriminator starts at `first_active_step` > 0, on a
  backend that runs the skipped discriminator branches (runtime/backend.py): called, lowered
  and inspected as the full program, with `waiting`, the same step without the
  discriminator's branches, for the dispatches that end by `first_active_step`
  (program_for). Both programs give the same autoencoder and the same untouched discriminator
  before the start: the full one selects zeros for the adversarial term and the old state for
  the discriminator there."""

  def __init__(self, full, waiting, first_active_step):
    self.full, self.waiting, self.first_active_step = full, waiting, first_active_step

  def __call__(self, state, *inputs):
    return self.full(state, *inputs)

  def lower(self, state, *inputs):
    return self.full.lower(state, *inputs)

  def __getattr__(self, name):
    if name in ("full", "waiting", "first_active_step"):  # not yet set (copy, pickle)
      raise AttributeError(name)
    return getattr(self.full, name)


def program_for(train_fn, step, num_steps):
  """The program that runs the dispatch of steps [step, step + num_steps): the waiting one
  when `train_fn` has one and the dispatch ends by the discriminator's first active step."""
  if isinstance(train_fn, WithWaitingProgram) and step + num_steps <= train_fn.first_active_step:
    return train_fn.waiting
  return train_fn


def programs(train_fn):
  """Every program `train_fn` dispatches to (jax_private.compilations counts them)."""
  if isinstance(train_fn, WithWaitingProgram):
    return [train_fn.full, train_fn.waiting]
  return [train_fn]


def _build_train_fn(runner, graphdef, tx, cfg, unroll, state, inputs, constants):
  """build_train_fn's one program; `constants` already on the devices (or shapes)."""
  R, batch = parallel.REPLICATED, parallel.batch_axis
  layout = layout_of(runner, state.params, state.adversary.params if state.adversary else None)
  kinds: tuple[Any, ...]
  fn: Any  # (state, *inputs, constants=None) -> (state, metrics)
  if inputs == "indices":
    fn, kinds = (
      functools.partial(gather_train_steps, graphdef, tx, cfg, layout, unroll),
      (R, batch(1)),
    )
  elif inputs == "batches":
    fn, kinds = functools.partial(train_steps, graphdef, tx, cfg, layout, unroll), (batch(1),)
  elif inputs == "one_step":
    fn, kinds = functools.partial(train_step, graphdef, tx, cfg, layout), (batch(0),)
  else:
    raise ValueError(f"unknown inputs {inputs!r}: use indices, batches or one_step")
  state_kind = runner.state_specs(state) if runner.backend == "shard_map" else R
  if constants is None:
    return runner.wrap(fn, (state_kind, *kinds), (state_kind, R), donate_argnums=(0,))
  takes_constants = lambda state, constants, *inputs: fn(state, *inputs, constants=constants)
  jitted = runner.wrap(takes_constants, (state_kind, R, *kinds), (state_kind, R), (0,))
  return WithConstants(jitted, constants)


def _is_abstract(tree):
  return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))
