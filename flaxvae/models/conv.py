"""A residual conv VAE for 28x28 and 32x32 images, with sub-pixel upsampling.

Each stage halves the resolution with a stride-2 3x3 conv and adds residual blocks; the
decoder mirrors it and upsamples with a 3x3 conv to 4x the channels followed by
depth-to-space (sub-pixel conv), which XLA:CPU runs far faster than the gradient of a strided
transposed conv.
"""

import math

import jax.numpy as jnp
from flax import nnx

from flaxvae.errors import ConfigError
from flaxvae.models import layers
from flaxvae.models.gaussian_latent import GaussianLatentVAE
from flaxvae.models.registry import MODELS


@MODELS.register("conv")
class ConvVAE(GaussianLatentVAE):
  def __init__(
    self,
    *,
    image_shape,
    likelihood,
    rngs,
    dtype=jnp.float32,
    latent_dim=16,
    channels=(32, 64),
    blocks_per_stage=1,
    activation="relu",
  ):
    height, width, colors = image_shape
    scale = 2 ** len(channels)
    if height % scale or width % scale:
      raise ConfigError(
        f"model.channels has {len(channels)} stages, which need image sides "
        f"divisible by {scale}; got {height}x{width}"
      )
    self.image_shape, self.likelihood, self.latent_dim = image_shape, likelihood, latent_dim
    self.act, self.dtype = layers.ACTIVATIONS[activation], dtype
    out_channels = likelihood.channels_out(colors)
    blocks = lambda c: nnx.List(
      [layers.ResidualBlock(c, self.act, rngs, dtype) for _ in range(blocks_per_stage)]
    )
    ins = [colors, *channels[:-1]]
    self.down = nnx.List([layers.conv(i, o, rngs, dtype, stride=2) for i, o in zip(ins, channels)])
    self.down_blocks = nnx.List([blocks(c) for c in channels])
    self.bottom = (height // scale, width // scale, channels[-1])
    flat = math.prod(self.bottom)
    self.to_posterior = layers.dense(flat, 2 * latent_dim, rngs, dtype)
    self.from_latent = layers.dense(latent_dim, flat, rngs, dtype)
    outs = [*reversed(channels[:-1]), out_channels]
    self.up_blocks = nnx.List([blocks(c) for c in reversed(channels)])
    self.up = nnx.List(
      [layers.conv(i, 4 * o, rngs, dtype) for i, o in zip(reversed(channels), outs)]
    )

  def encode(self, x):
    h = x.astype(self.dtype)
    for down, stage in zip(self.down, self.down_blocks):
      h = self.act(down(h))
      for block in stage:
        h = block(h)
    h = self.to_posterior(self.act(h).reshape(h.shape[0], -1))
    mean, logvar = jnp.split(h, 2, axis=-1)
    return layers.f32(mean, logvar)

  def decode(self, z):
    h = self.from_latent(z.astype(self.dtype)).reshape(z.shape[0], *self.bottom)
    for stage, up in zip(self.up_blocks, self.up):
      for block in stage:
        h = block(h)
      h = layers.depth_to_space(up(self.act(h)))
    return h.astype(jnp.float32)
