"""ELBO, k-sample ELBO, IWAE, beta, KL warm-up and free bits, from the model contract's terms.

Inputs are `models.contract.Terms`-shaped: log p(x|z) [k, b] and per latent layer (top first)
log q, log p [k, b] and per-unit KL contributions [k, b, units]. Everything is per example;
the trainer and evaluator take means. Pure functions of arrays: no Flax, no state, no config.
"""

import math

import jax
import jax.numpy as jnp


def log_mean_exp(values, axis=0):
  return jax.nn.logsumexp(values, axis=axis) - math.log(values.shape[axis])


def device_mean(tree, axis_name):
  """Mean over the devices of a named axis; the identity when there is one device.

  XLA:CPU keeps a one-participant all-reduce as a real collective (a copy of every
  gradient per step, a visible cost on a small model's step), so a single device skips it.
  """
  if axis_name is None or jax.lax.axis_size(axis_name) == 1:
    return tree
  return jax.lax.pmean(tree, axis_name)


def kl_weight(step, beta=1.0, warmup_steps=0):
  """beta, ramped linearly from 0 over `warmup_steps` (KL warm-up / annealing)."""
  if not warmup_steps:
    return jnp.asarray(beta, jnp.float32)
  return beta * jnp.minimum(1.0, step.astype(jnp.float32) / warmup_steps)


def layer_kl(layer):
  """[k, b]: the layer's KL estimate for each sample (the sum of its per-unit contributions)."""
  return jnp.sum(layer.kl.astype(jnp.float32), axis=-1)


def log_weights(terms):
  """[k, b] log p(x, z_k) / q(z_k | x): the importance weights of the k samples."""
  log_w = terms.log_px_z.astype(jnp.float32)
  for layer in terms.layers:
    log_w = log_w + layer.log_p.astype(jnp.float32) - layer.log_q.astype(jnp.float32)
  return log_w


def free_bits_penalty(terms, free_bits, per, axis_name=None):
  """[k, b] KL penalty with the free-bits floor of Kingma et al. (2016).

  Groups of latents (each unit, or each layer) whose KL, averaged over the global batch and
  the samples, is below `free_bits` nats cost the constant `free_bits` (no gradient), so the
  batch mean equals sum_groups max(free_bits, mean KL_group). With `axis_name` the mean is
  over the global batch, so the result does not depend on the device count.
  """
  total = 0.0
  for layer in terms.layers:
    kl = layer.kl.astype(jnp.float32)  # [k, b, units]
    if per == "layer":
      kl = jnp.sum(kl, axis=-1, keepdims=True)
    group_mean = device_mean(jnp.mean(kl, axis=(0, 1)), axis_name)
    total = total + jnp.sum(jnp.where(group_mean > free_bits, kl, free_bits), axis=-1)
  return total


def per_example(
  terms, objective="elbo", kl_scale=1.0, free_bits=0.0, free_bits_per="unit", axis_name=None
):
  """Everything the trainer and evaluator need from one batch, per example ([b] float32):

  loss          the quantity to minimise: -(ELBO with kl_scale and free bits), or -IWAE;
  elbo          the true (beta = 1) ELBO, averaged over the k samples;
  rate          the total KL(q(z|x) || p(z)) estimate, averaged over the k samples;
  distortion    -E_q log p(x|z), averaged over the k samples;
  iwae          the k-sample importance-weighted bound log mean_k p(x, z_k)/q(z_k|x);
  rate_by_layer [b, L] each layer's KL, top layer first.
  """
  log_px_z = terms.log_px_z.astype(jnp.float32)
  kls = jnp.stack([layer_kl(layer) for layer in terms.layers], axis=-1)  # [k, b, L]
  rate_by_layer = jnp.mean(kls, axis=0)
  rate = jnp.sum(rate_by_layer, axis=-1)
  distortion = -jnp.mean(log_px_z, axis=0)
  iwae = log_mean_exp(log_weights(terms), axis=0)
  if objective == "iwae":
    loss = -iwae
  elif objective == "elbo":
    penalty = (
      jnp.mean(free_bits_penalty(terms, free_bits, free_bits_per, axis_name), axis=0)
      if free_bits
      else rate
    )
    loss = distortion + kl_scale * penalty
  else:
    raise ValueError(f"unknown objective {objective!r}: use elbo or iwae")
  return dict(
    loss=loss,
    elbo=-distortion - rate,
    rate=rate,
    distortion=distortion,
    iwae=iwae,
    rate_by_layer=rate_by_layer,
  )


def bits_per_dim(nats_per_example, num_dims):
  """Converts nats per example to bits per data dimension."""
  return nats_per_example / (num_dims * math.log(2.0))
