"""VAE models in Flax NNX, chosen by name from a registry (`config.model.name`).

Every model maps images `[batch, H, W, C]` (floats in [0, 1]) to a diagonal
Gaussian posterior with `encode(x) -> (mean, logvar)` and latents `[n, latent]`
to raw likelihood parameters `[n, H, W, C, num_params]` with `decode(z)`.
Parameters are float32; `dtype` sets the compute precision (bfloat16 on
accelerators), and outputs are returned in float32 for the loss reductions.
"""
import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from flaxvae.errors import ConfigError

_MODELS: dict[str, Callable] = {}

ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "silu": jax.nn.silu,
               "tanh": jnp.tanh, "elu": jax.nn.elu, "softplus": jax.nn.softplus}


def register(name):
  def add(cls):
    _MODELS[name] = cls
    return cls
  return add


def check_config(model_config):
  """Raises ConfigError for a model config that cannot be built, before any data is read."""
  if model_config.name not in _MODELS:
    raise ConfigError(f"unknown model.name {model_config.name!r}: choose one of {sorted(_MODELS)}")
  if model_config.activation not in ACTIVATIONS:
    raise ConfigError(f"unknown model.activation {model_config.activation!r}: "
                      f"choose one of {sorted(ACTIVATIONS)}")
  if model_config.latent_dim <= 0:
    raise ConfigError(f"model.latent_dim must be positive, got {model_config.latent_dim}")


def create_model(model_config, *, image_shape, num_params, seed=0, dtype=jnp.float32):
  """Builds the registered model `model_config.name` for images of `image_shape`."""
  check_config(model_config)
  kwargs = {k: v for k, v in model_config.items() if k != "name"}
  return _MODELS[model_config.name](image_shape=tuple(image_shape), num_params=num_params,
                                    rngs=nnx.Rngs(seed), dtype=dtype, **kwargs)


def _f32(*arrays):
  return tuple(a.astype(jnp.float32) for a in arrays)


@register("mlp")
class MLPVAE(nnx.Module):
  """Fully connected encoder and mirrored decoder (the classic 784-400-20 VAE by default)."""

  def __init__(self, *, image_shape, num_params, latent_dim, hidden=(400,), activation="relu",
               rngs, dtype=jnp.float32):
    self.image_shape, self.num_params, self.latent_dim = image_shape, num_params, latent_dim
    self.act = ACTIVATIONS[activation]
    self.dtype = dtype
    dims = math.prod(image_shape)
    dense = lambda i, o: nnx.Linear(i, o, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    widths = [dims, *hidden]
    self.encoder = nnx.List([dense(a, b) for a, b in zip(widths[:-1], widths[1:])])
    self.to_mean = dense(widths[-1], latent_dim)
    self.to_logvar = dense(widths[-1], latent_dim)
    widths = [latent_dim, *reversed(hidden)]
    self.decoder = nnx.List([dense(a, b) for a, b in zip(widths[:-1], widths[1:])])
    self.to_output = dense(widths[-1], dims * num_params)

  def encode(self, x):
    h = x.reshape(x.shape[0], -1).astype(self.dtype)
    for layer in self.encoder:
      h = self.act(layer(h))
    return _f32(self.to_mean(h), self.to_logvar(h))

  def decode(self, z):
    h = z.astype(self.dtype)
    for layer in self.decoder:
      h = self.act(layer(h))
    out = self.to_output(h).astype(jnp.float32)
    return out.reshape(z.shape[0], *self.image_shape, self.num_params)


class ResidualBlock(nnx.Module):
  """x + conv1x1(act(conv3x3(act(x)))): cheap on CPU, standard on accelerators."""

  def __init__(self, channels, act, rngs, dtype):
    self.act = act
    self.conv = nnx.Conv(channels, channels, (3, 3), dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.proj = nnx.Conv(channels, channels, (1, 1), dtype=dtype, param_dtype=jnp.float32, rngs=rngs)

  def __call__(self, x):
    return x + self.proj(self.act(self.conv(self.act(x))))


def depth_to_space(x, factor=2):
  """[b, h, w, c*f*f] -> [b, h*f, w*f, c]: the sub-pixel upsampling step."""
  b, h, w, c = x.shape
  x = x.reshape(b, h, w, factor, factor, c // factor**2)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h * factor, w * factor, c // factor**2)


@register("conv")
class ConvVAE(nnx.Module):
  """Residual conv VAE for 28x28 and 32x32 images.

  Each stage halves the resolution with a stride-2 3x3 conv and adds residual
  blocks; the decoder mirrors it and upsamples with a 3x3 conv to 4x the
  channels followed by depth-to-space (sub-pixel conv), which XLA:CPU runs far
  faster than the gradient of a strided transposed conv.
  """

  def __init__(self, *, image_shape, num_params, latent_dim, channels=(32, 64), blocks_per_stage=1,
               activation="relu", rngs, dtype=jnp.float32):
    height, width, colors = image_shape
    scale = 2 ** len(channels)
    if height % scale or width % scale:
      raise ConfigError(f"model.channels has {len(channels)} stages, which need image sides "
                        f"divisible by {scale}; got {height}x{width}")
    self.image_shape, self.num_params, self.latent_dim = image_shape, num_params, latent_dim
    self.act, self.dtype = ACTIVATIONS[activation], dtype
    conv = lambda i, o, k=3, s=1: nnx.Conv(i, o, (k, k), strides=s, dtype=dtype,
                                           param_dtype=jnp.float32, rngs=rngs)
    blocks = lambda c: nnx.List([ResidualBlock(c, self.act, rngs, dtype)
                                 for _ in range(blocks_per_stage)])
    ins = [colors, *channels[:-1]]
    self.down = nnx.List([conv(i, o, s=2) for i, o in zip(ins, channels)])
    self.down_blocks = nnx.List([blocks(c) for c in channels])
    self.bottom = (height // scale, width // scale, channels[-1])
    flat = math.prod(self.bottom)
    dense = lambda i, o: nnx.Linear(i, o, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.to_posterior = dense(flat, 2 * latent_dim)
    self.from_latent = dense(latent_dim, flat)
    outs = [*reversed(channels[:-1]), colors * num_params]
    self.up_blocks = nnx.List([blocks(c) for c in reversed(channels)])
    self.up = nnx.List([conv(i, 4 * o) for i, o in zip(reversed(channels), outs)])

  def encode(self, x):
    h = x.astype(self.dtype)
    for down, stage in zip(self.down, self.down_blocks):
      h = self.act(down(h))
      for block in stage:
        h = block(h)
    h = self.to_posterior(self.act(h).reshape(h.shape[0], -1))
    mean, logvar = jnp.split(h, 2, axis=-1)
    return _f32(mean, logvar)

  def decode(self, z):
    h = self.from_latent(z.astype(self.dtype)).reshape(z.shape[0], *self.bottom)
    for stage, up in zip(self.up_blocks, self.up):
      for block in stage:
        h = block(h)
      h = depth_to_space(up(self.act(h)))
    out = h.astype(jnp.float32)
    return out.reshape(z.shape[0], *self.image_shape, self.num_params)
