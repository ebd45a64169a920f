"""Gradient-norm guards: which steps the train step refuses to apply.

A step is skipped when its gradient norm is above `optimizer.skip_threshold`
(a fixed ceiling) or above `optimizer.adaptive_skip` times the
`adaptive_skip_quantile` of the last `adaptive_skip_window` finite norms.

The window lives in the TrainState on device (no host sync per step) and is
checkpointed with it, so a resumed run skips exactly the same steps. Every
finite norm enters the window, skipped or not: if the norms move to a new
level for good, the quantile follows them and training cannot get stuck
skipping every step. Pure functions of arrays, run inside the jitted step.
"""

import jax.numpy as jnp

MIN_HISTORY = 20  # norms needed before the adaptive threshold applies


def enabled(cfg):
  """True when a gradient-norm threshold is set (StepConfig fields)."""
  return bool(cfg.skip_threshold or cfg.adaptive_skip)


def init(adaptive_skip, window):
  """The guard part of a fresh TrainState: () unless the adaptive threshold is on."""
  if not adaptive_skip:
    return ()
  return {"norms": jnp.full((window,), jnp.nan, jnp.float32), "count": jnp.zeros((), jnp.int32)}


def threshold(guard, cfg):
  """The gradient norm above which this step is skipped (inf when no threshold applies)."""
  limit = jnp.float32(cfg.skip_threshold) if cfg.skip_threshold else jnp.float32(jnp.inf)
  if cfg.adaptive_skip:
    history = jnp.minimum(guard["count"], guard["norms"].shape[0])
    recent = jnp.nanquantile(guard["norms"], cfg.adaptive_skip_quantile)
    adaptive = jnp.where(
      history >= min(MIN_HISTORY, guard["norms"].shape[0]), cfg.adaptive_skip * recent, jnp.inf
    )
    limit = jnp.minimum(limit, adaptive)
  return limit


def update(guard, grad_norm):
  """Records a finite norm in the ring buffer (skipped steps too: see the module docstring)."""
  if not guard:
    return guard
  finite = jnp.isfinite(grad_norm)
  slot = guard["count"] % guard["norms"].shape[0]
  norms = guard["norms"].at[slot].set(jnp.where(finite, grad_norm, guard["norms"][slot]))
  return {"norms": norms, "count": guard["count"] + finite.astype(jnp.int32)}
