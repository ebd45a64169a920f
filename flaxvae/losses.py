"""The VAE objective as pure functions of arrays: no Flax, no state, no config.

Conventions: a batch of data `x` has shape `[batch, *event]`; the decoder returns
raw likelihood parameters of shape `[..., batch, *event, num_params]`; every
log-density is summed over the event dims, so it is one number per example
(nats). Posteriors are diagonal Gaussians given as (mean, logvar); the prior is
N(0, I).
"""
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from flaxvae.errors import ConfigError

LOG_2PI = math.log(2 * math.pi)


# ---------------------------------------------------------------------------
# Gaussians
# ---------------------------------------------------------------------------
def gaussian_kl(mean, logvar):
  """Analytic KL(N(mean, exp(logvar)) || N(0, I)) per example, summed over latents."""
  return 0.5 * jnp.sum(jnp.exp(logvar) + mean**2 - 1.0 - logvar, axis=-1)


def log_normal(z, mean, logvar):
  """log N(z; mean, exp(logvar)), summed over the last axis."""
  return -0.5 * jnp.sum(LOG_2PI + logvar + (z - mean) ** 2 * jnp.exp(-logvar), axis=-1)


def log_standard_normal(z):
  """log N(z; 0, I), summed over the last axis."""
  return -0.5 * jnp.sum(LOG_2PI + z**2, axis=-1)


def reparameterize(key, mean, logvar, num_samples=1):
  """`num_samples` draws z = mean + sigma * eps, stacked on a new leading axis."""
  eps = jax.random.normal(key, (num_samples, *mean.shape), mean.dtype)
  return mean + jnp.exp(0.5 * logvar) * eps


# ---------------------------------------------------------------------------
# Likelihoods p(x|z). Data are floats in [0, 1]; 8-bit data are k/255.
# ---------------------------------------------------------------------------
def bernoulli_log_prob(raw, x):
  """log Bernoulli(x; sigmoid(logits)) in the stable form x*l - softplus(l).

  For x in [0, 1] that are not binary this is the negative binary cross-entropy
  that the classic VAE examples report.
  """
  logits = raw[..., 0]
  return x * logits - jax.nn.softplus(logits)


def gaussian_log_prob(raw, x, fixed_logvar=None):
  """Gaussian with the decoder's mean and either a learned or a fixed log-variance."""
  mean = raw[..., 0]
  logvar = raw[..., 1] if fixed_logvar is None else fixed_logvar
  return -0.5 * (LOG_2PI + logvar + (x - mean) ** 2 * jnp.exp(-logvar))


def discretized_logistic_log_prob(raw, x, num_bins=256):
  """Logistic mass of the bin of width 1/(num_bins-1) around x; edge bins take the tails.

  Follows the PixelCNN++ form; the log-sigmoid/softplus identities keep it stable.
  """
  mean = raw[..., 0]
  log_scale = jnp.maximum(raw[..., 1], -7.0)
  half_bin = 0.5 / (num_bins - 1)
  inv_scale = jnp.exp(-log_scale)
  plus = inv_scale * (x - mean + half_bin)
  minus = inv_scale * (x - mean - half_bin)
  log_cdf_plus = jax.nn.log_sigmoid(plus)  # log F(upper edge), for the lowest bin
  log_one_minus_cdf_minus = -jax.nn.softplus(minus)  # log(1 - F(lower edge)), for the top bin
  cdf_delta = jax.nn.sigmoid(plus) - jax.nn.sigmoid(minus)
  mid = inv_scale * (x - mean)
  # Far in the tails cdf_delta underflows: use the density at the bin centre times its width.
  log_pdf_mid = mid - log_scale - 2.0 * jax.nn.softplus(mid) + jnp.log(2 * half_bin)
  log_mass = jnp.where(cdf_delta > 1e-5, jnp.log(jnp.maximum(cdf_delta, 1e-12)), log_pdf_mid)
  return jnp.where(x < half_bin, log_cdf_plus,
                   jnp.where(x > 1.0 - half_bin, log_one_minus_cdf_minus, log_mass))


class Likelihood(NamedTuple):
  """A decoder output family: how many raw parameters per data dim, and log p per dim."""
  num_params: int
  log_prob: Callable  # (raw [..., *event, num_params], x [..., *event]) -> per-dim log p
  mean: Callable  # raw -> the expected value of x, for image grids
  discrete: bool  # whether log p is a probability mass (then bits/dim is meaningful)


def get_likelihood(name, gaussian_logvar=None):
  """Picks a likelihood by name: bernoulli, gaussian (learned or fixed variance), discretized_logistic."""
  if name == "bernoulli":
    return Likelihood(1, bernoulli_log_prob, lambda raw: jax.nn.sigmoid(raw[..., 0]), True)
  if name == "gaussian":
    if gaussian_logvar is None:
      return Likelihood(2, gaussian_log_prob, lambda raw: raw[..., 0], False)
    log_prob = lambda raw, x: gaussian_log_prob(raw, x, fixed_logvar=gaussian_logvar)
    return Likelihood(1, log_prob, lambda raw: raw[..., 0], False)
  if name == "discretized_logistic":
    return Likelihood(2, discretized_logistic_log_prob,
                      lambda raw: jnp.clip(raw[..., 0], 0.0, 1.0), True)
  raise ConfigError(f"unknown objective.likelihood {name!r}: use bernoulli, gaussian or discretized_logistic")


def sample_log_prob(likelihood: "Likelihood", raw, x):
  """log p(x|z_k) per sample and example, [k, batch], from raw [k, batch, *event, P] (any
  layout with that many values) and x [batch, *event].

  Data dims are flattened first: XLA:CPU fuses and vectorizes the elementwise
  likelihood and its sum far better over one axis than over [H, W, C].
  """
  batch, dims = x.shape[0], math.prod(x.shape[1:])
  raw = raw.reshape(-1, batch, dims, likelihood.num_params)
  log_p = likelihood.log_prob(raw, x.reshape(1, batch, dims)).astype(jnp.float32)
  return jnp.sum(log_p, axis=-1)


# ---------------------------------------------------------------------------
# ELBO, k-sample ELBO and IWAE
# ---------------------------------------------------------------------------
def log_mean_exp(values, axis=0):
  return jax.nn.logsumexp(values, axis=axis) - math.log(values.shape[axis])


def device_mean(tree, axis_name):
  """Mean over the devices of a named axis; the identity when there is one device.

  XLA:CPU keeps a one-participant all-reduce as a real collective (a copy of every
  gradient per step, ~5% of the MLP step), so a single device skips it.
  """
  if axis_name is None or jax.lax.axis_size(axis_name) == 1:
    return tree
  return jax.lax.pmean(tree, axis_name)


def kl_weight(step, beta=1.0, warmup_steps=0):
  """beta, ramped linearly from 0 over `warmup_steps` (KL warm-up / annealing)."""
  if not warmup_steps:
    return jnp.asarray(beta, jnp.float32)
  return beta * jnp.minimum(1.0, step.astype(jnp.float32) / warmup_steps)


def free_bits_kl(mean, logvar, free_bits, axis_name=None):
  """Per-example KL with the free-bits floor of Kingma et al. (2016).

  A latent dim whose batch-mean KL is below `free_bits` nats costs the constant
  `free_bits` (no gradient), so the batch mean of the result equals
  sum_d max(free_bits, mean_batch KL_d). With `axis_name` the batch mean is taken
  over the global batch, so the result does not depend on the device count.
  """
  kl_per_dim = 0.5 * (jnp.exp(logvar) + mean**2 - 1.0 - logvar)
  batch_mean = jnp.mean(kl_per_dim, axis=0)
  batch_mean = device_mean(batch_mean, axis_name)
  return jnp.sum(jnp.where(batch_mean > free_bits, kl_per_dim, free_bits), axis=-1)


def vae_terms(eps, x, mean, logvar, decode: Callable, likelihood: Likelihood,
              objective="elbo", kl_scale=1.0, free_bits=0.0, axis_name=None):
  """Everything the trainer and evaluator need from one batch, per example.

  `eps` [k, batch, latent] is standard-normal noise: z_k = mean + sigma * eps_k
  (the reparameterization trick), so the caller decides how noise is keyed.
  Returns a dict of [batch] float32 arrays:
    loss        the quantity to minimise: -(ELBO with kl_scale and free bits), or -IWAE;
    elbo        the true (beta = 1) ELBO, the average over the k samples;
    rate        KL(q(z|x) || p(z)), analytic;
    distortion  -E_q log p(x|z), averaged over the k samples;
    iwae        the k-sample importance-weighted bound log mean_k p(x,z_k)/q(z_k|x).
  """
  z = mean + jnp.exp(0.5 * logvar) * eps  # [k, batch, latent]
  log_px_z = sample_log_prob(likelihood, decode(z.reshape(-1, z.shape[-1])), x)  # [k, b]
  mean32, logvar32, z32 = (a.astype(jnp.float32) for a in (mean, logvar, z))
  rate = gaussian_kl(mean32, logvar32)
  distortion = -jnp.mean(log_px_z, axis=0)
  elbo = -distortion - rate
  log_w = log_px_z + log_standard_normal(z32) - log_normal(z32, mean32, logvar32)
  iwae = log_mean_exp(log_w, axis=0)
  if objective == "iwae":
    loss = -iwae
  elif objective == "elbo":
    reg = free_bits_kl(mean32, logvar32, free_bits, axis_name) if free_bits else rate
    loss = distortion + kl_scale * reg
  else:
    raise ValueError(f"unknown objective {objective!r}: use elbo or iwae")
  return dict(loss=loss, elbo=elbo, rate=rate, distortion=distortion, iwae=iwae)


def bits_per_dim(nats_per_example, num_dims):
  """Converts nats per example to bits per data dimension."""
  return nats_per_example / (num_dims * math.log(2.0))
