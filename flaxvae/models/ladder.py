"""The IWAE paper's multi-stochastic-layer MLP VAE (Burda et al. 2016), any number of layers.

With the defaults: 784-200-200-100 (z1) -100-100-50 (z2), tanh, Gaussian conditionals.
Inference runs bottom-up, q(z1|x) q(z2|z1); generation top-down, p(z2) p(z1|z2) p(x|z1), each
conditional an MLP mirroring the inference net. The top layer's KL to N(0, I) is analytic
given its sampled input; lower layers' KLs are single-sample (log q - log p per unit), since
their prior depends on a layer sampled after them.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from flaxvae.errors import ConfigError
from flaxvae.models import contract, layers
from flaxvae.models.registry import MODELS
from flaxvae.objectives import gaussian


class GaussianHead(nnx.Module):
  """An MLP to (mean, logvar) of a diagonal Gaussian."""

  def __init__(self, widths, latent_dim, act, rngs, dtype):
    self.body = layers.DenseStack(widths, act, rngs, dtype)
    self.to_mean = layers.dense(widths[-1], latent_dim, rngs, dtype)
    self.to_logvar = layers.dense(widths[-1], latent_dim, rngs, dtype)

  def __call__(self, h):
    h = self.body(h)
    return layers.f32(self.to_mean(h), self.to_logvar(h))


@MODELS.register("ladder_mlp")
class LadderMLPVAE(nnx.Module):
  CAPABILITIES = (contract.POSTERIOR_DENSITY,)

  def __init__(
    self,
    *,
    image_shape,
    likelihood,
    rngs,
    dtype=jnp.float32,
    hidden=((200, 200), (100, 100)),
    latent_dims=(100, 50),
    activation="tanh",
  ):
    if len(hidden) != len(latent_dims) or not latent_dims:
      raise ConfigError(
        f"model.hidden has {len(hidden)} groups of widths but model.latent_dims "
        f"{len(latent_dims)} layers: give one group of hidden widths per layer"
      )
    act = layers.ACTIVATIONS[activation]
    self.image_shape, self.likelihood, self.dtype = image_shape, likelihood, dtype
    height, width, colors = image_shape
    self.raw_shape = (height, width, likelihood.channels_out(colors))
    self.latent_dims = tuple(latent_dims)  # bottom first, as in the paper's description
    inputs = [math.prod(image_shape), *latent_dims[:-1]]
    self.inference = nnx.List(
      [GaussianHead([i, *h], d, act, rngs, dtype) for i, h, d in zip(inputs, hidden, latent_dims)]
    )
    self.generative = nnx.List(
      [
        GaussianHead(
          [latent_dims[i + 1], *reversed(hidden[i + 1])], latent_dims[i], act, rngs, dtype
        )
        for i in range(len(latent_dims) - 1)
      ]
    )
    self.to_x = layers.DenseStack([latent_dims[0], *reversed(hidden[0])], act, rngs, dtype)
    self.to_output = layers.dense(hidden[0][0], math.prod(self.raw_shape), rngs, dtype)

  @property
  def latent_shapes(self):
    return tuple((d,) for d in reversed(self.latent_dims))  # top first

  def _decode(self, z0):
    lead = z0.shape[:-1]
    h = self.to_x(z0.reshape(-1, z0.shape[-1]).astype(self.dtype))
    return self.to_output(h).astype(jnp.float32).reshape(*lead, *self.raw_shape)

  def _prior(self, i, z_above):
    """(mean, logvar) of p(z_i | z_{i+1}); N(0, I) for the top layer (z_above None)."""
    if z_above is None:
      return 0.0, 0.0
    return self.generative[i](z_above.astype(self.dtype))

  def _posterior_pass(self, x, noise):
    """Bottom-up samples: [(z, mean, logvar)] bottom first, each [k, b, d]."""
    h = jnp.broadcast_to(
      x.reshape(1, x.shape[0], -1), (noise.num_samples, x.shape[0], math.prod(x.shape[1:]))
    )
    out, top = [], len(self.latent_dims) - 1
    for i, head in enumerate(self.inference):
      mean, logvar = head(h.astype(self.dtype))
      z = mean + jnp.exp(0.5 * logvar) * noise.normal(top - i, (self.latent_dims[i],))
      out.append((z, mean, logvar))
      h = z
    return out

  def terms(self, x, noise):
    samples = self._posterior_pass(x, noise)
    top = len(samples) - 1
    result = []
    for i in range(top, -1, -1):
      z, mean, logvar = samples[i]
      prior_mean, prior_logvar = self._prior(i, samples[i + 1][0] if i < top else None)
      log_q = gaussian.log_normal_per_unit(z, mean, logvar)
      log_p = gaussian.log_normal_per_unit(z, prior_mean, prior_logvar)
      kl = gaussian.kl_per_unit(mean, logvar) if i == top else log_q - log_p
      result.append(
        contract.LatentLayer(
          z=z, log_q=jnp.sum(log_q, -1), log_p=jnp.sum(log_p, -1), kl=kl, q_mean=mean
        )
      )
    log_px_z = self.likelihood.log_prob(self._decode(samples[0][0]), x)
    return contract.Terms(log_px_z, tuple(result))

  def log_prior(self, zs):
    zs, total = zs[::-1], 0.0  # bottom first
    for i, z in enumerate(zs):
      mean, logvar = self._prior(i, zs[i + 1] if i + 1 < len(zs) else None)
      total = total + jnp.sum(gaussian.log_normal_per_unit(z, mean, logvar), -1)
    return total

  def log_joint(self, x, zs):
    return self.likelihood.log_prob(self.generate(zs), x) + self.log_prior(zs)

  def generate(self, zs):
    return self._decode(zs[-1])

  def prior_sample(self, key, n):
    keys = jax.random.split(key, len(self.latent_dims))
    zs = []
    for level in range(len(self.latent_dims)):
      i = len(self.latent_dims) - 1 - level
      mean, logvar = self._prior(i, zs[-1] if zs else None)
      zs.append(
        mean + jnp.exp(0.5 * logvar) * jax.random.normal(keys[level], (n, self.latent_dims[i]))
      )
    return tuple(zs)

  def log_posterior(self, x, zs):
    zs, h, total = zs[::-1], x.reshape(x.shape[0], -1), 0.0
    for head, z in zip(self.inference, zs):
      mean, logvar = head(h.astype(self.dtype))
      total, h = total + gaussian.log_normal(z, mean, logvar), z
    return total

  def _generate(self, eps, zs_top, temperature):
    """Completes latents top-down: the given top ones, the rest from the prior at temperature.

    `eps(level, dim)` gives [n, dim] standard-normal noise for layer `level` (0 is the top).
    """
    temps = jnp.broadcast_to(
      jnp.asarray(temperature, jnp.float32).reshape(-1), (len(self.latent_dims),)
    )
    zs = list(zs_top)
    for level in range(len(zs), len(self.latent_dims)):
      i = len(self.latent_dims) - 1 - level
      mean, logvar = self._prior(i, zs[-1] if zs else None)
      zs.append(mean + jnp.exp(0.5 * logvar) * temps[level] * eps(level, self.latent_dims[i]))
    return self._decode(zs[-1])

  def sample(self, key, n, temperature=1.0):
    keys = jax.random.split(key, len(self.latent_dims))
    return self._generate(lambda level, d: jax.random.normal(keys[level], (n, d)), [], temperature)

  def reconstruct(self, x, noise, keep_layers=None):
    samples = self._posterior_pass(x, noise)
    keep = len(samples) if keep_layers is None else keep_layers
    tops = [samples[i][0][0] for i in range(len(samples) - 1, -1, -1)][:keep]
    depth = len(self.latent_dims)  # prior draws use noise streams after the posterior's
    return self._generate(lambda level, d: noise.normal(depth + level, (d,))[0], tops, 1.0)
