"""Building blocks the models share: dense stacks, conv helpers, activations, dtype handling.

Parameters are float32; `dtype` sets the compute precision (bfloat16 on accelerators) and
outputs that feed the loss are returned in float32.
"""

import contextlib
import contextvars

import jax
import jax.numpy as jnp
from flax import nnx

from flaxvae.objectives import elementwise

ACTIVATIONS = {
  "relu": jax.nn.relu,
  "gelu": jax.nn.gelu,
  "silu": jax.nn.silu,
  "tanh": jnp.tanh,
  "elu": jax.nn.elu,
  "softplus": elementwise.softplus,
}


_SHAPES_ONLY = contextvars.ContextVar("flaxvae_shapes_only", default=False)


@contextlib.contextmanager
def shapes_only():
  """Inside, a model is being built from shapes alone (create_model(abstract=True)): a layer may
  repeat another's shapes instead of tracing an initialisation nobody will see."""
  token = _SHAPES_ONLY.set(True)
  try:
    yield
  finally:
    _SHAPES_ONLY.reset(token)


def building_shapes_only():
  return _SHAPES_ONLY.get()


def f32(*arrays):
  return tuple(a.astype(jnp.float32) for a in arrays)


def dense(i, o, rngs, dtype, **kwargs):
  return nnx.Linear(i, o, dtype=dtype, param_dtype=jnp.float32, rngs=rngs, **kwargs)


class PointwiseConv(nnx.Conv):
  """A 1x1, stride-1 nnx.Conv (same parameters, same numbers) run as a matmul over channels.

  Why: differentiated as a convolution, its kernel gradient is a convolution whose batch is
  the channels, and XLA:CPU transposes both activations ([b, h, w, c] -> [c, h, w, b]) to run
  it; as a dot it reads the input in place and transposes at most the narrower operand (the
  VDVAE step's profile before and after: README, "What limits the small VDVAE").
  """

  def __call__(self, inputs):
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = self.promote_dtype((inputs, self.kernel[...], bias), dtype=self.dtype)
    y = jnp.einsum("...c,cd->...d", inputs, kernel[0, 0], precision=self.precision)
    return y if bias is None else y + bias


def conv(i, o, rngs, dtype, kernel=3, stride=1, **kwargs):
  """A SAME-padded conv with float32 parameters; 1x1 stride-1 ones as PointwiseConv."""
  pointwise = kernel == 1 and stride == 1 and not kwargs
  return (PointwiseConv if pointwise else nnx.Conv)(
    i,
    o,
    (kernel, kernel),
    strides=stride,
    dtype=dtype,
    param_dtype=jnp.float32,
    rngs=rngs,
    **kwargs,
  )


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
