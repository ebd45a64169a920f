"""Optax optimizers and learning-rate schedules built from the optimizer section of the
settings (settings.OptimizerSettings), by name.

Schedules: `constant`; `warmup_constant` (linear warm-up, then flat: VDVAE); `warmup_cosine`
(linear warm-up over `warmup_steps`, flat until `decay_start`, then cosine decay to
`end_factor` x the peak by `num_steps`: Efficient-VDVAE's schedule; with decay_start 0 it is
the usual warm-up-cosine).
"""

import jax
import optax

from flaxvae.errors import ConfigError
from flaxvae.registry import Registry

OPTIMIZERS = Registry("optimizer.name")
SCHEDULES = ("constant", "warmup_constant", "warmup_cosine")


def _decayed(tx, c):
  """Decoupled weight decay (AdamW-style) after `tx`'s direction, before the learning rate."""
  return tx if not c.weight_decay else optax.chain(tx, optax.add_decayed_weights(c.weight_decay))


OPTIMIZERS.register("adam")(lambda lr, c: optax.adam(lr, b1=c.b1, b2=c.b2, eps=c.eps))
OPTIMIZERS.register("adamw")(
  lambda lr, c: optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay)
)
OPTIMIZERS.register("adamax")(
  lambda lr, c: optax.chain(
    _decayed(optax.scale_by_adamax(b1=c.b1, b2=c.b2, eps=c.eps), c),
    optax.scale_by_learning_rate(lr),
  )
)
OPTIMIZERS.register("lamb")(
  lambda lr, c: optax.lamb(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay)
)


def learning_rate_schedule(optimizer, num_steps):
  c, lr = optimizer, optimizer.learning_rate
  if c.schedule == "constant":
    return optax.constant_schedule(lr)
  warmup = optax.linear_schedule(0.0, lr, max(c.warmup_steps, 1))
  if c.schedule == "warmup_constant":
    return optax.join_schedules([warmup, optax.constant_schedule(lr)], [c.warmup_steps])
  if c.schedule == "warmup_cosine" and not c.decay_start:
    return optax.warmup_cosine_decay_schedule(
      0.0,
      lr,
      warmup_steps=c.warmup_steps,
      decay_steps=max(num_steps, c.warmup_steps + 1),
      end_value=lr * c.end_factor,
    )
  if c.schedule == "warmup_cosine":
    start = max(c.decay_start, c.warmup_steps)
    cosine = optax.cosine_decay_schedule(lr, max(num_steps - start, 1), alpha=c.end_factor)
    return optax.join_schedules(
      [warmup, optax.constant_schedule(lr), cosine], [c.warmup_steps, start]
    )
  raise ConfigError(f"unknown optimizer.schedule {c.schedule!r}: use {', '.join(SCHEDULES)}")


def create_optimizer(optimizer, num_steps):
  """The gradient transformation of `optimizer` (settings.OptimizerSettings), and the schedule
  (so the trainer can log the rate).

  Groups in `optimizer.frozen` (top-level parameter keys) get zero updates: trained as a
  fixed part of the model (the encoder-only experiment freezes the decoder). Gradient
  clipping happens in the train step, which knows the norm of sharded gradients.
  """
  make = OPTIMIZERS.get(optimizer.name)
  if not optimizer.learning_rate > 0:
    raise ConfigError(f"optimizer.learning_rate must be positive, got {optimizer.learning_rate}")
  schedule = learning_rate_schedule(optimizer, num_steps)
  tx = make(schedule, optimizer)
  if optimizer.frozen:
    frozen = set(optimizer.frozen)
    mask = lambda params: {
      k: jax.tree.map(lambda _: k in frozen, v)  # noqa: B023  (called within its iteration)
      for k, v in params.items()
    }
    tx = optax.chain(tx, optax.masked(optax.set_to_zero(), mask))
  return tx, schedule
