"""Building blocks the models share: dense stacks, conv helpers, activations, dtype handling.

Parameters are float32; `dtype` sets the compute precision (bfloat16 on accelerators) and
outputs that feed the loss are returned in float32.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from flaxvae.objectives import elementwise

ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "silu": jax.nn.silu,
               "tanh": jnp.tanh, "elu": jax.nn.elu, "softplus": elementwise.softplus}


def f32(*arrays):
  return tuple(a.astype(jnp.float32) for a in arrays)


def dense(i, o, rngs, dtype, **kwargs):
  return nnx.Linear(i, o, dtype=dtype, param_dtype=jnp.float32, rngs=rngs, **kwargs)


def conv(i, o, rngs, dtype, kernel=3, stride=1, **kwargs):
  return nnx.Conv(i, o, (kernel, kernel), strides=stride, dtype=dtype, param_dtype=jnp.float32,
                  rngs=rngs, **kwargs)


class DenseStack(nnx.Module):
  """act(dense(...)) for each width in turn: the hidden layers of an MLP."""

  def __init__(self, widths, act, rngs, dtype):
    self.act = act
    self.layers = nnx.List([dense(a, b, rngs, dtype) for a, b in zip(widths[:-1], widths[1:])])

  def __call__(self, h):
    for layer in self.layers:
      h = self.act(layer(h))
    return h


class ResidualBlock(nnx.Module):
  """x + conv1x1(act(conv3x3(act(x)))): cheap on CPU, standard on accelerators."""

  def __init__(self, channels, act, rngs, dtype):
    self.act = act
    self.conv = conv(channels, channels, rngs, dtype)
    self.proj = conv(channels, channels, rngs, dtype, kernel=1)

  def __call__(self, x):
    return x + self.proj(self.act(self.conv(self.act(x))))


def depth_to_space(x, factor=2):
  """[b, h, w, c*f*f] -> [b, h*f, w*f, c]: the sub-pixel upsampling step."""
  b, h, w, c = x.shape
  x = x.reshape(b, h, w, factor, factor, c // factor**2)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h * factor, w * factor, c // factor**2)
