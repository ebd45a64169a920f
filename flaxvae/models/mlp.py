"""The fully connected VAE: the classic 784-400-20 model by default, with a Gaussian or an IAF
posterior (`model.posterior`; Kingma et al. 2016), so the gap decomposition of Cremer et al.
(2018) can compare exactly these two families on one decoder."""

import math

import jax.numpy as jnp

from flaxvae.errors import ConfigError
from flaxvae.models import contract, layers
from flaxvae.models.gaussian_latent import GaussianLatentVAE
from flaxvae.models.iaf import IAF
from flaxvae.models.registry import MODELS

POSTERIORS = ("gaussian", "iaf")


@MODELS.register("mlp")
class MLPVAE(GaussianLatentVAE):
  """Fully connected encoder and mirrored decoder; the posterior is Gaussian or an IAF.

  `encoder_hidden` gives the encoder its own widths (the decoder keeps `hidden`): Cremer et
  al.'s larger encoder, which shrinks the amortization gap.
  """

  def __init__(
    self,
    *,
    image_shape,
    likelihood,
    rngs,
    dtype=jnp.float32,
    latent_dim=20,
    hidden=(400,),
    activation="relu",
    posterior="gaussian",
    iaf_steps=2,
    iaf_hidden=320,
    iaf_context=64,
    encoder_hidden=(),
  ):
    if posterior not in POSTERIORS:
      raise ConfigError(f"unknown model.posterior {posterior!r}: use gaussian or iaf")
    self.image_shape, self.likelihood, self.latent_dim = image_shape, likelihood, latent_dim
    self.dtype = dtype
    act = layers.ACTIVATIONS[activation]
    height, width, colors = image_shape
    dims = math.prod(image_shape)
    self.raw_shape = (height, width, likelihood.channels_out(colors))
    encoder_hidden = tuple(encoder_hidden) or tuple(hidden)  # a larger encoder: Cremer et al.
    features = encoder_hidden[-1] if encoder_hidden else dims
    self.encoder = layers.DenseStack([dims, *encoder_hidden], act, rngs, dtype).layers
    self.act = act
    self.to_mean = layers.dense(features, latent_dim, rngs, dtype)
    self.to_logvar = layers.dense(features, latent_dim, rngs, dtype)
    self.decoder = layers.DenseStack([latent_dim, *reversed(hidden)], act, rngs, dtype).layers
    self.to_output = layers.dense(
      hidden[0] if hidden else latent_dim, math.prod(self.raw_shape), rngs, dtype
    )
    if posterior == "iaf":
      self.to_context = layers.dense(features, iaf_context, rngs, dtype)
      self.flow = IAF(latent_dim, iaf_context, iaf_steps, iaf_hidden, rngs, dtype)
      self.analytic_kl = False  # a flow's q has no closed-form KL: per-unit log q - log p
      self.CAPABILITIES = (contract.LOCAL_POSTERIOR,)
    else:
      self.flow = None

  def _features(self, x):
    h = x.reshape(x.shape[0], -1).astype(self.dtype)
    for layer in self.encoder:
      h = self.act(layer(h))
    return h

  def encode(self, x):
    h = self._features(x)
    return layers.f32(self.to_mean(h), self.to_logvar(h))

  def encode_local(self, x):
    h = self._features(x)
    if self.flow is None:
      return layers.f32(self.to_mean(h), self.to_logvar(h))
    return layers.f32(self.to_mean(h), self.to_logvar(h), self.to_context(h))

  def posterior_sample(self, local, eps):
    z, log_q = super().posterior_sample(local[:2], eps)
    if self.flow is None:
      return z, log_q
    z, log_sigma = self.flow(z, local[2])
    return z, log_q - log_sigma

  def decode(self, z):
    h = z.astype(self.dtype)
    for layer in self.decoder:
      h = self.act(layer(h))
    out = self.to_output(h).astype(jnp.float32)
    return out.reshape(z.shape[0], *self.raw_shape)
