"""The model contract for one diagonal-Gaussian latent layer with an N(0, I) prior.

A subclass gives `encode_local(x)` (its per-example variational parameters: (mean, logvar),
plus whatever a richer posterior needs), `posterior_sample(local, eps)` (z and the per-unit
log q of it) and `decode(z [n, latent]) -> raw [n, H, W, channels_out]`; this base turns them
into `terms`, `log_joint`, sampling and reconstruction (models/contract.py).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from flaxvae.models import contract
from flaxvae.objectives import gaussian


class GaussianLatentVAE(nnx.Module):
  """Base of single-latent-layer VAEs (mlp, conv): subclasses set likelihood, image_shape,
  latent_dim and implement encode(x) -> (mean, logvar) and decode(z)."""

  CAPABILITIES = (
    contract.LOCAL_POSTERIOR,
    contract.AGGREGATE_POSTERIOR,
    contract.POSTERIOR_DENSITY,
  )

  @property
  def latent_shapes(self):
    return ((self.latent_dim,),)

  # -- the posterior ---------------------------------------------------------------------
  def encode_local(self, x):
    return self.encode(x)

  def posterior_sample(self, local, eps):
    """z = mean + sigma * eps and its per-unit log q ([..., latent] each)."""
    mean, logvar = local
    z = mean + jnp.exp(0.5 * logvar) * eps
    return z, gaussian.log_normal_per_unit(z, mean, logvar)

  # -- the contract ----------------------------------------------------------------------
  def log_likelihood(self, x, z):
    """log p(x|z) for latents [k, b, latent] -> [k, b]."""
    k, b = z.shape[:2]
    raw = self.decode(z.reshape(k * b, -1))
    return self.likelihood.log_prob(raw.reshape(k, b, *raw.shape[1:]), x)

  def terms_given(self, x, local, noise):
    eps = noise.normal(0, (self.latent_dim,))  # [k, b, latent]
    z, log_q_units = self.posterior_sample(local, eps)
    log_p_units = gaussian.log_normal_per_unit(z, 0.0, 0.0)
    if self.analytic_kl:
      mean, logvar = local[0], local[1]
      kl = jnp.broadcast_to(gaussian.kl_per_unit(mean, logvar), z.shape)
      q_mean = jnp.broadcast_to(mean, z.shape)
    else:
      kl, q_mean = log_q_units - log_p_units, z
    layer = contract.LatentLayer(
      z=z, log_q=jnp.sum(log_q_units, -1), log_p=jnp.sum(log_p_units, -1), kl=kl, q_mean=q_mean
    )
    return contract.Terms(self.log_likelihood(x, z), (layer,))

  def terms(self, x, noise):
    return self.terms_given(x, self.encode_local(x), noise)

  analytic_kl = True  # a Gaussian q has a closed-form KL to N(0, I); a flow does not

  def log_joint(self, x, zs):
    (z,) = zs
    return self.log_likelihood(x, z[None])[0] + gaussian.log_standard_normal(z)

  def log_prior(self, zs):
    return gaussian.log_standard_normal(zs[0])

  def prior_sample(self, key, n):
    return (jax.random.normal(key, (n, self.latent_dim)),)

  def generate(self, zs):
    return self.decode(zs[0])

  def log_posterior(self, x, zs):
    mean, logvar = self.encode(x)[:2]
    return gaussian.log_normal(zs[0], mean, logvar)

  def sample(self, key, n, temperature=1.0):
    t = jnp.asarray(temperature, jnp.float32).reshape(-1)[0]
    return self.decode(t * jax.random.normal(key, (n, self.latent_dim)))

  def reconstruct(self, x, noise, keep_layers=1):
    """keep_layers >= 1: z from q(z|x); 0: from the prior (a sample unrelated to x)."""
    eps = noise.normal(0, (self.latent_dim,))[0]
    z = self.posterior_sample(self.encode_local(x), eps)[0] if keep_layers else eps
    return self.decode(z)
