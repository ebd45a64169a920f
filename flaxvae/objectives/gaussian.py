"""Diagonal Gaussians: densities and KLs, summed over the last axis unless said otherwise."""

import math

import jax
import jax.numpy as jnp

LOG_2PI = math.log(2 * math.pi)


def kl_per_unit(mean, logvar, prior_mean=None, prior_logvar=None):
  """KL(N(mean, e^logvar) || N(prior_mean, e^prior_logvar)) per unit; the prior is N(0, 1) if
  None."""
  if prior_mean is None:
    return 0.5 * (jnp.exp(logvar) + mean**2 - 1.0 - logvar)
  return 0.5 * (
    prior_logvar
    - logvar
    + (jnp.exp(logvar) + (mean - prior_mean) ** 2) * jnp.exp(-prior_logvar)
    - 1.0
  )


def kl_to_standard(mean, logvar):
  """Analytic KL(N(mean, exp(logvar)) || N(0, I)) per example, summed over the last axis."""
  return jnp.sum(kl_per_unit(mean, logvar), axis=-1)


def log_normal_per_unit(z, mean, logvar):
  return -0.5 * (LOG_2PI + logvar + (z - mean) ** 2 * jnp.exp(-logvar))


def log_normal(z, mean, logvar):
  """log N(z; mean, exp(logvar)), summed over the last axis."""
  return jnp.sum(log_normal_per_unit(z, mean, logvar), axis=-1)


def log_standard_normal(z):
  """log N(z; 0, I), summed over the last axis."""
  return -0.5 * jnp.sum(LOG_2PI + z**2, axis=-1)


def reparameterize(key, mean, logvar, num_samples=1):
  """`num_samples` draws z = mean + sigma * eps, stacked on a new leading axis."""
  eps = jax.random.normal(key, (num_samples, *mean.shape), mean.dtype)
  return mean + jnp.exp(0.5 * logvar) * eps
