"""Optax optimizers and learning-rate schedules built from `config.optimizer`."""
import optax

from flaxvae.models import ConfigError

_OPTIMIZERS = {
    "adam": lambda lr, c: optax.adam(lr, b1=c.b1, b2=c.b2, eps=c.eps),
    "adamw": lambda lr, c: optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay),
    "adamax": lambda lr, c: optax.adamax(lr, b1=c.b1, b2=c.b2, eps=c.eps),
    "lamb": lambda lr, c: optax.lamb(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay),
}


def learning_rate_schedule(opt_config, num_steps):
  """constant, or linear warm-up then cosine decay to `end_factor` x the peak by `num_steps`."""
  lr = opt_config.learning_rate
  if opt_config.schedule == "constant":
    return optax.constant_schedule(lr)
  if opt_config.schedule == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps=opt_config.warmup_steps,
        decay_steps=max(num_steps, opt_config.warmup_steps + 1), end_value=lr * opt_config.end_factor)
  raise ConfigError(f"unknown optimizer.schedule {opt_config.schedule!r}: use constant or warmup_cosine")


def create_optimizer(opt_config, num_steps):
  """The gradient transformation, and the schedule (so the trainer can log the rate)."""
  if opt_config.name not in _OPTIMIZERS:
    raise ConfigError(f"unknown optimizer.name {opt_config.name!r}: choose one of {sorted(_OPTIMIZERS)}")
  if not opt_config.learning_rate > 0:
    raise ConfigError(f"optimizer.learning_rate must be positive, got {opt_config.learning_rate}")
  schedule = learning_rate_schedule(opt_config, num_steps)
  tx = _OPTIMIZERS[opt_config.name](schedule, opt_config)
  if opt_config.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(opt_config.grad_clip_norm), tx)
  return tx, schedule
