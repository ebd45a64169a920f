"""The PatchGAN discriminator of LDM's autoencoders (pix2pix's NLayerDiscriminator, as taming uses).

Why a module of its own: the adversary is a second player with its own parameters, optimizer and
BatchNorm statistics; the train step holds it as pure dicts and calls `discriminate`, a pure
function, inside its shard_map, never nnx.jit.

Layout (kernel 4, padding 1, LeakyReLU 0.2), for `num_layers` = n and `width` = w:
  blocks[0]       conv stride 2, channels -> w, with bias, no norm
  blocks[k], k<n  conv stride 2 -> w * min(2^k, 8), no bias when normalised, norm
  blocks[n]       conv stride 1 -> w * min(2^n, 8), no bias when normalised, norm
  conv_out        conv stride 1 -> 1 logit per patch
so each logit sees a 70x70 patch for n = 3, and a 256x256 image gives a 30x30 map.

Initialisation as taming's `weights_init`: conv kernels N(0, 0.02), norm scales N(1, 0.02) and
norm offsets 0; conv biases keep PyTorch's default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as taming
leaves them.

Norms ("norm"):
  batch  BatchNorm over the GLOBAL batch: the mean and the centred second moment are averaged
         over `axis_name` (the mesh's batch axes) with two pmeans, so 8 devices with 4 images each
         normalise exactly as one device with 32. Running statistics update as PyTorch's
         (momentum 0.1, the unbiased variance over the global batch), eps 1e-5.
  group  GroupNorm: 32 groups, or the largest divisor of the channels not above 32 when 32 does not
         divide them (for narrow test widths); eps 1e-5. No running statistics.
  none   no normalisation (biases on every conv).
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from flaxvae.errors import ConfigError

NORMS = ("batch", "group", "none")
KERNEL, PADDING, SLOPE = 4, 1, 0.2
MAX_MULTIPLIER = 8
GROUPS, EPSILON, MOMENTUM = 32, 1e-5, 0.1
INIT_STD = 0.02


def layer_channels(num_layers, width):
  """Output channels of blocks[0..num_layers] (conv_out adds the single logit channel)."""
  return [width * min(2**k, MAX_MULTIPLIER) for k in range(num_layers + 1)]


def logit_side(side, num_layers):
  """The logit map's side for an image side: each stride-2 conv maps s -> s // 2, each of the two
  stride-1 convs s -> s - 1 (kernel 4, padding 1)."""
  for _ in range(num_layers):
    side = (side + 2 * PADDING - KERNEL) // 2 + 1
  return side - 2


def check_image_size(settings, height, width):
  """A one-line ConfigError when the images are too small for `settings.num_layers` strides."""
  for side in (height, width):
    if logit_side(side, settings.num_layers) < 1:
      raise ConfigError(
        f"adversary.num_layers={settings.num_layers} halves {height}x{width} images too often "
        "for a logit map: lower adversary.num_layers or use larger images"
      )


def group_count(channels, groups=GROUPS):
  """`groups`, or the largest divisor of `channels` not above it."""
  return max(g for g in range(1, min(groups, channels) + 1) if channels % g == 0)


def _flat_normal(key, shape, dtype):
  """jax.random.normal(key, shape): the same numbers, drawn as one vector and reshaped, which
  XLA:CPU compiles several times faster than a draw of a 4-d shape."""
  return jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)


def _kernel_init(key, shape, dtype=jnp.float32):
  return INIT_STD * _flat_normal(key, shape, dtype)


def _torch_default_bias(fan_in):
  bound = 1.0 / fan_in**0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _scale_init(key, shape, dtype=jnp.float32):
  return 1.0 + INIT_STD * _flat_normal(key, shape, dtype)


def _conv(in_channels, out_channels, stride, use_bias, rngs, dtype):
  return nnx.Conv(
    in_channels,
    out_channels,
    kernel_size=(KERNEL, KERNEL),
    strides=stride,
    padding=((PADDING, PADDING), (PADDING, PADDING)),
    use_bias=use_bias,
    kernel_init=_kernel_init,
    bias_init=_torch_default_bias(in_channels * KERNEL * KERNEL),
    dtype=dtype,
    param_dtype=jnp.float32,
    rngs=rngs,
  )


class GlobalBatchNorm(nnx.Module):
  """BatchNorm whose batch is the global one: moments pmean'ed over `axis_name` in train mode.

  The variance is the mean of (x - global mean)^2 (two passes, as PyTorch computes it), not
  E[x^2] - E[x]^2, which cancels badly when the mean is large. Statistics are float32 whatever
  the compute dtype.
  """

  def __init__(self, channels, *, axis_name, rngs, dtype=jnp.float32):
    self.axis_name, self.dtype = axis_name, dtype
    self.scale = nnx.Param(_scale_init(rngs.params(), (channels,)))
    self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((channels,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((channels,), jnp.float32))

  def _global_mean(self, x):
    mean = jnp.mean(x, axis=tuple(range(x.ndim - 1)))
    return mean if self.axis_name is None else jax.lax.pmean(mean, self.axis_name)

  def __call__(self, x, train):
    h = x.astype(jnp.float32)
    if train:
      mean = self._global_mean(h)
      var = self._global_mean(jnp.square(h - mean))
      count = h.size // h.shape[-1]
      if self.axis_name is not None:
        count *= jax.lax.axis_size(self.axis_name)
      unbiased = var * (count / max(count - 1, 1))
      # set_value replaces the arrays: `[...] =` would write into a caller's numpy stats
      self.mean.set_value((1 - MOMENTUM) * self.mean.get_value() + MOMENTUM * mean)
      self.var.set_value((1 - MOMENTUM) * self.var.get_value() + MOMENTUM * unbiased)
    else:
      mean, var = self.mean[...], self.var[...]
    h = (h - mean) * jax.lax.rsqrt(var + EPSILON) * self.scale[...] + self.bias[...]
    return h.astype(self.dtype)


class GroupNorm(nnx.Module):
  """nnx.GroupNorm with taming's N(1, 0.02) scales; `train` is accepted and ignored."""

  def __init__(self, channels, *, rngs, dtype=jnp.float32):
    self.norm = nnx.GroupNorm(
      channels,
      num_groups=group_count(channels),
      epsilon=EPSILON,
      scale_init=_scale_init,
      dtype=dtype,
      param_dtype=jnp.float32,
      rngs=rngs,
    )

  def __call__(self, x, train):
    del train
    return self.norm(x)


class DiscriminatorBlock(nnx.Module):
  def __init__(self, conv, norm):
    self.conv, self.norm = conv, norm

  def __call__(self, x, train):
    h = self.conv(x)
    if self.norm is not None:
      h = self.norm(h, train)
    return jax.nn.leaky_relu(h, SLOPE)


class PatchDiscriminator(nnx.Module):
  """Images in [-1, 1], [b, H, W, C] -> patch logits [b, h, w, 1] (float32)."""

  def __init__(
    self,
    *,
    image_channels,
    rngs,
    num_layers=3,
    width=64,
    norm="batch",
    axis_name=None,
    dtype=jnp.float32,
  ):
    if norm not in NORMS:
      raise ConfigError(f"unknown adversary.norm {norm!r}: use one of {', '.join(NORMS)}")
    if num_layers < 1 or width < 1:
      raise ConfigError(
        f"adversary.num_layers ({num_layers}) and adversary.width ({width}) must be positive"
      )
    self.dtype = dtype
    channels = layer_channels(num_layers, width)
    normalised = norm != "none"

    def make_norm(c):
      if norm == "batch":
        return GlobalBatchNorm(c, axis_name=axis_name, rngs=rngs, dtype=dtype)
      return GroupNorm(c, rngs=rngs, dtype=dtype) if norm == "group" else None

    blocks = [DiscriminatorBlock(_conv(image_channels, width, 2, True, rngs, dtype), None)]
    for k in range(1, num_layers + 1):
      stride = 2 if k < num_layers else 1
      conv = _conv(channels[k - 1], channels[k], stride, not normalised, rngs, dtype)
      blocks.append(DiscriminatorBlock(conv, make_norm(channels[k])))
    self.blocks = nnx.List(blocks)
    self.conv_out = _conv(channels[-1], 1, 1, True, rngs, dtype)

  def __call__(self, images11, train=True):
    h = images11.astype(self.dtype)
    for block in self.blocks:
      h = block(h, train)
    return self.conv_out(h).astype(jnp.float32)


def create_discriminator(settings, image_channels, seed, axis_name=None, dtype=jnp.float32):
  """The PatchGAN of `settings` (reads num_layers, width, norm). `axis_name`: the mesh's batch
  axes ("data", ("data", "fsdp")) inside the step's shard_map, None on one device."""
  return PatchDiscriminator(
    image_channels=image_channels,
    num_layers=settings.num_layers,
    width=settings.width,
    norm=settings.norm,
    axis_name=axis_name,
    dtype=dtype,
    rngs=nnx.Rngs(seed),
  )


def split_discriminator(model):
  """(graphdef, params, stats) of a discriminator: `params` the pure dict of its nnx.Param state,
  `stats` of its BatchStat state ({} without BatchNorm), what `discriminate` takes."""
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(stats)


def discriminate(graphdef, params, stats, images11, train=True):
  """Pure: (logits [b, h, w, 1] float32, new_stats). In train mode BatchNorm normalises with the
  global batch's moments and returns its running statistics updated; in eval mode it uses the
  running statistics and returns `stats` unchanged. Jittable, and runs inside jax.shard_map over
  the axes the discriminator was created with.

  Each call is one BatchNorm batch (taming scores reals and reconstructions in separate calls,
  so each normalises with its own batch's moments, and each train-mode call moves the running
  statistics once).
  """
  model = nnx.merge(graphdef, params, stats)
  logits = model(images11, train=train)
  if not train:
    return logits, stats
  return logits, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
