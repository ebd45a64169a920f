"""LDM's KL autoencoder (the Stable Diffusion, SDXL, SD3 and FLUX VAE class) on the model contract.

Why here: latent diffusion and flow models train in the latent space of this autoencoder, and
it is trained as a beta-VAE with a tiny KL weight plus perceptual and adversarial terms. Here it
is an ordinary flaxvae model (one Gaussian latent layer [h, w, latent_channels] with an N(0, I)
prior), so the ELBO machinery, evaluation and sampling work on it unchanged, and it also gives
the "reconstruction" capability (contract.Reconstructs) that the image losses need.

Architecture (LDM's `diffusionmodules/model.py`, as diffusers' `AutoencoderKL` lays it out):
ResNet blocks (GroupNorm, eps 1e-6, statistics in float32 -> swish -> 3x3 conv, twice; a 1x1
shortcut where the width changes), stride-2 downsampling after LDM's asymmetric (0, 1, 0, 1)
zero padding, nearest-neighbour x2 upsampling followed by a 3x3 conv, single-head
self-attention (scale c^-0.5) in the middle blocks and at `attention_resolutions`, and
`num_res_blocks` blocks per level in the encoder, one more in the decoder. The posterior is
N(mean, exp(logvar)) with logvar clamped to [-30, 20] (LDM's DiagonalGaussianDistribution).

Names map one to one to diffusers' state dict (the next issue imports weights): module paths
are diffusers' (`decoder.up_blocks[0]` is the LOWEST resolution, as there), leaves are
`kernel` (conv weight, OIHW -> HWIO; Linear weight transposed), `scale` (GroupNorm weight) and
`bias`, and the attention's `to_out` is diffusers' `to_out.0`.

Pixels: the data x01 are in [0, 1]; the networks work in [-1, 1] (x11 = 2 x01 - 1, padded with
zeros to `pad_to`). The decoder's output out11 becomes the likelihood's parameters:
  laplace   mean = (out11 + 1) / 2, log b = logvar - log 2: -log p(x01) is then exactly LDM's
            nll |x11 - out11| / exp(logvar) + logvar per pixel (objectives/likelihoods.py).
  gaussian  mean = (out11 + 1) / 2, log-variance = logvar - 2 log 2: `logvar` is the
            log-variance in [-1, 1] units (a variance scales by 1/4 from [-1, 1] to [0, 1]),
            so -log p(x01) = (x11 - out11)^2 / (2 exp(logvar)) + logvar / 2 + const, LDM's nll
            with L2 in place of L1, halved as a Gaussian's is.
With a likelihood of fixed scale (one raw channel per image channel) the raw is the mean alone.
`logvar` is LDM's scalar: a parameter (top-level group "logvar") with learn_logvar=True, else
the constant logvar_init. Any other likelihood takes the decoder's output as its raw parameters
(conv_out then emits likelihood.channels_out(C) channels).

Accelerators: `dtype` is the compute dtype (parameters stay float32; the normalisation
statistics, the attention softmax and everything the loss reads are float32), `remat`
recomputes each ResNet block (with its attention) in the backward pass, and `scan_blocks` runs
the identical blocks of a level with one `lax.scan` over their parameters, stacked at call
time, so the parameter layout (and any checkpoint) is the same either way.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxvae.errors import ConfigError, UsageError
from flaxvae.models import contract, layers
from flaxvae.models.registry import MODELS
from flaxvae.objectives import gaussian

NORM_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)  # LDM's clamp on the posterior's log-variance
MEAN_AND_SCALE = ("laplace", "gaussian")  # likelihoods fed LDM's (out11, logvar)


TRUNCATED_STD = 0.87962566103423978  # the std of N(0, 1) truncated to [-2, 2]
LECUN_NORMAL = jax.nn.initializers.lecun_normal()


def host_lecun_normal(key, shape, dtype=jnp.float32):
  """nnx's default kernel initializer (normal truncated at 2 standard deviations, variance
  1 / fan-in), drawn by numpy from the key's bits when the model is built eagerly.

  Why: eagerly, jax compiles its initializer once per distinct parameter shape, and this
  model has dozens of shapes: most of its build time on a CPU. Traced (create_model's
  abstract build), jax's own initializer of the same distribution stands in."""
  if isinstance(key, jax.core.Tracer):
    return LECUN_NORMAL(key, shape, dtype)
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key), np.uint32).ravel())
  draws = rng.standard_normal(shape)
  outside = np.abs(draws) > 2.0
  while outside.any():
    draws[outside] = rng.standard_normal(int(outside.sum()))
    outside = np.abs(draws) > 2.0
  fan_in = math.prod(shape[:-1])
  return jnp.asarray(draws / (TRUNCATED_STD * math.sqrt(fan_in)), dtype)


def host_constant(value):
  """An initializer of `value` everywhere, made on the host (no compile per shape)."""
  return lambda key, shape, dtype=jnp.float32: jnp.asarray(np.full(shape, value), dtype)


HOST_INIT = dict(kernel_init=host_lecun_normal, bias_init=host_constant(0.0))


def conv(i, o, rngs, dtype, kernel=3, stride=1, padding="SAME"):
  """A float32-parameter conv initialised on the host; 1x1 stride-1 ones as matmuls
  (layers.PointwiseConv)."""
  pointwise = kernel == 1 and stride == 1
  return (layers.PointwiseConv if pointwise else nnx.Conv)(
    i,
    o,
    (kernel, kernel),
    strides=stride,
    padding=padding,
    dtype=dtype,
    param_dtype=jnp.float32,
    rngs=rngs,
    **HOST_INIT,
  )


def dense(i, o, rngs, dtype):
  return nnx.Linear(i, o, dtype=dtype, param_dtype=jnp.float32, rngs=rngs, **HOST_INIT)


class GroupNorm(nnx.Module):
  """GroupNorm (eps 1e-6) whose statistics and affine map are computed in float32 whatever the
  compute dtype: a bfloat16 variance of large activations is the classic NaN source.

  The statistics are two passes (mean, then the mean square about it) of per-channel sums over
  the pixels, combined into groups on the small [b, c] arrays: reduced over [b, h, w, groups,
  c/groups] instead, the pixels' reduction kept a minor axis of c/groups (2 at 64 channels and
  32 groups), which XLA:CPU ran several times slower forward and backward
  (docs/performance.md)."""

  def __init__(self, channels, groups, dtype):
    self.groups, self.dtype = groups, dtype
    self.scale = nnx.Param(host_constant(1.0)(None, (channels,)))
    self.bias = nnx.Param(host_constant(0.0)(None, (channels,)))

  def __call__(self, x):
    b, h, w, c = x.shape
    size = c // self.groups
    count = h * w * size

    def group_means(channel_sums):  # [b, c] sums over the pixels -> [b, c] means of the groups
      sums = jnp.sum(channel_sums.reshape(b, self.groups, size), axis=-1)
      return jnp.repeat(sums / count, size, axis=-1)

    x = x.astype(jnp.float32)
    centred = x - group_means(jnp.sum(x, axis=(1, 2)))[:, None, None, :]
    var = group_means(jnp.sum(jnp.square(centred), axis=(1, 2)))
    scale = jax.lax.rsqrt(var + NORM_EPS) * self.scale[...]
    return (centred * scale[:, None, None, :] + self.bias[...]).astype(self.dtype)


class ResnetBlock(nnx.Module):
  """norm1 -> swish -> conv1 -> norm2 -> swish -> conv2, plus x (through conv_shortcut, a 1x1
  conv, where the width changes)."""

  def __init__(self, cin, cout, groups, rngs, dtype):
    self.norm1 = GroupNorm(cin, groups, dtype)
    self.conv1 = conv(cin, cout, rngs, dtype)
    self.norm2 = GroupNorm(cout, groups, dtype)
    self.conv2 = conv(cout, cout, rngs, dtype)
    self.conv_shortcut = conv(cin, cout, rngs, dtype, kernel=1) if cin != cout else None

  def __call__(self, x):
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nnx.Module):
  """Single-head self-attention over the pixels, residual; q, k, v and out are Dense layers on
  the channels (LDM's 1x1 convs; diffusers' Linear layers)."""

  def __init__(self, channels, groups, rngs, dtype):
    self.dtype = dtype
    self.group_norm = GroupNorm(channels, groups, dtype)
    make = lambda: dense(channels, channels, rngs, dtype)
    self.to_q, self.to_k, self.to_v, self.to_out = make(), make(), make(), make()

  def __call__(self, x):
    b, h, w, c = x.shape
    tokens = self.group_norm(x).reshape(b, h * w, c)
    q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
    scores = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * c**-0.5
    weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = jnp.einsum("bqk,bkc->bqc", weights, v)
    return x + self.to_out(out).reshape(b, h, w, c)


class Downsample(nnx.Module):
  """Pad (0, 1, 0, 1) with zeros, then a 3x3 stride-2 VALID conv (LDM's asymmetric padding)."""

  def __init__(self, channels, rngs, dtype):
    self.conv = conv(channels, channels, rngs, dtype, stride=2, padding="VALID")

  def __call__(self, x):
    return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
  """Nearest-neighbour x2, then a 3x3 conv ('same' padding), computed at the input's resolution.

  Each output pixel of one of the four phases (row and column parity) sees a 2x2 patch of the
  input: the 3x3 taps that land on one source pixel of the upsampled image are summed into
  one. Four 2x2 convolutions at the low resolution (16 taps per input pixel) replace a 3x3
  convolution at the high one (36 taps per input pixel): 2.25x fewer FLOPs, the same numbers up
  to float rounding, the same parameter (a [3, 3, c, c] kernel, diffusers' layout)
  (docs/performance.md)."""

  def __init__(self, channels, rngs, dtype):
    self.conv = conv(channels, channels, rngs, dtype)

  def __call__(self, x):
    dtype = self.conv.dtype
    x, kernel, bias = x.astype(dtype), self.conv.kernel[...], self.conv.bias[...]
    phases = []
    for row_phase, row_kernel in enumerate(_phase_kernels(kernel, axis=0)):
      row = []
      for col_phase, phase_kernel in enumerate(_phase_kernels(row_kernel, axis=1)):
        # phase 0 reads input pixels (i - 1, i), phase 1 (i, i + 1): zero beyond the border
        padding = tuple(((1, 0), (0, 1))[phase] for phase in (row_phase, col_phase))
        out = jax.lax.conv_general_dilated(
          x,
          phase_kernel.astype(dtype),
          window_strides=(1, 1),
          padding=padding,
          dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        row.append(out)
      phases.append(jnp.stack(row, axis=3))  # [b, h, w, col phase, c]
    b, h, w, _, c = phases[0].shape
    y = jnp.stack(phases, axis=2).reshape(b, 2 * h, 2 * w, c)  # [b, h, row phase, w, ...]
    return y + bias.astype(dtype)


def _phase_kernels(kernel, axis):
  """A 3x3 kernel's two 2-tap kernels along `axis` after nearest x2 upsampling: the even
  output reads (taps 0 | 1 + 2), the odd one (taps 0 + 1 | 2)."""
  first, middle, last = jnp.split(kernel, 3, axis=axis)
  return (
    jnp.concatenate([first, middle + last], axis=axis),
    jnp.concatenate([first + middle, last], axis=axis),
  )


class Level(nnx.Module):
  """One resolution: resnets[j] (each followed by attentions[j] where the level attends), then
  the optional resampler (diffusers' Down/UpDecoderBlock2D and their Attn variants)."""

  def __init__(self, cin, cout, count, attend, resample, groups, rngs, dtype):
    self.resnets = nnx.List(
      [ResnetBlock(cin if j == 0 else cout, cout, groups, rngs, dtype) for j in range(count)]
    )
    self.attentions = nnx.List(
      [Attention(cout, groups, rngs, dtype) for _ in range(count if attend else 0)]
    )
    if resample == "down":
      self.downsamplers = nnx.List([Downsample(cout, rngs, dtype)])
    elif resample == "up":
      self.upsamplers = nnx.List([Upsample(cout, rngs, dtype)])

  def units(self):
    """[(resnet, attention or None)] in the order they run."""
    attentions = list(self.attentions) or [None] * len(self.resnets)
    return list(zip(self.resnets, attentions))

  def __call__(self, h, scan, remat):
    h = run_units(self.units(), h, scan, remat)
    for resampler in (*getattr(self, "downsamplers", ()), *getattr(self, "upsamplers", ())):
      h = resampler(h)
    return h


class MidBlock(nnx.Module):
  """resnets[0] -> attentions[0] -> resnets[1] (diffusers' UNetMidBlock2D)."""

  def __init__(self, channels, groups, rngs, dtype):
    self.resnets = nnx.List([ResnetBlock(channels, channels, groups, rngs, dtype) for _ in "ab"])
    self.attentions = nnx.List([Attention(channels, groups, rngs, dtype)])

  def __call__(self, h, remat):
    units = [(self.resnets[0], self.attentions[0]), (self.resnets[1], None)]
    return run_units(units, h, False, remat)


def _run_unit(graphdefs, h, states):
  for graphdef, state in zip(graphdefs, states):
    h = nnx.merge(graphdef, state)(h)
  return h


def run_units(units, h, scan, remat):
  """Runs each (resnet, attention or None) unit in turn: each under jax.checkpoint if `remat`,
  and runs of identical units (same modules, same shapes) as one lax.scan if `scan`."""
  split = []
  for unit in units:
    pairs = [nnx.split(module) for module in unit if module is not None]
    split.append((tuple(g for g, _ in pairs), tuple(s for _, s in pairs)))
  shapes = lambda states: jax.tree.map(lambda a: a.shape, states)
  i = 0
  while i < len(split):
    graphdefs, states = split[i]
    end = i + 1
    while (
      scan
      and end < len(split)
      and split[end][0] == graphdefs
      and shapes(split[end][1]) == shapes(states)
    ):
      end += 1
    step = lambda h, states, graphdefs=graphdefs: _run_unit(graphdefs, h, states)
    if remat:
      step = jax.checkpoint(step)
    if end - i > 1:
      stack = jax.tree.map(lambda *a: jnp.stack(a), *[s for _, s in split[i:end]])
      h, _ = jax.lax.scan(lambda h, s, step=step: (step(h, s), None), h, stack)
    else:
      h = step(h, states)
    i = end
  return h


class Encoder(nnx.Module):
  def __init__(self, colors, widths, num_res_blocks, attend, latent_channels, groups, rngs, dtype):
    self.conv_in = conv(colors, widths[0], rngs, dtype)
    ins = [widths[0], *widths[:-1]]
    last = len(widths) - 1
    self.down_blocks = nnx.List(
      [
        Level(
          cin, cout, num_res_blocks, attend[i], "down" if i < last else None, groups, rngs, dtype
        )
        for i, (cin, cout) in enumerate(zip(ins, widths))
      ]
    )
    self.mid_block = MidBlock(widths[-1], groups, rngs, dtype)
    self.conv_norm_out = GroupNorm(widths[-1], groups, dtype)
    self.conv_out = conv(widths[-1], 2 * latent_channels, rngs, dtype)

  def __call__(self, x11, scan, remat):
    h = self.conv_in(x11)
    for level in self.down_blocks:
      h = level(h, scan, remat)
    h = self.mid_block(h, remat)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


class Decoder(nnx.Module):
  """up_blocks[0] is the lowest resolution (diffusers' order; LDM's up[n - 1])."""

  def __init__(
    self, out_channels, widths, num_res_blocks, attend, latent_channels, groups, rngs, dtype
  ):
    top = widths[-1]
    self.conv_in = conv(latent_channels, top, rngs, dtype)
    self.mid_block = MidBlock(top, groups, rngs, dtype)
    ups = list(reversed(widths))
    ins = [top, *ups[:-1]]
    last = len(widths) - 1
    self.up_blocks = nnx.List(
      [
        Level(
          cin,
          cout,
          num_res_blocks + 1,
          attend[last - i],
          "up" if i < last else None,
          groups,
          rngs,
          dtype,
        )
        for i, (cin, cout) in enumerate(zip(ins, ups))
      ]
    )
    self.conv_norm_out = GroupNorm(widths[0], groups, dtype)
    self.conv_out = conv(widths[0], out_channels, rngs, dtype)

  def features(self, z, scan, remat):
    """The input of conv_out: everything but the last layer."""
    h = self.mid_block(self.conv_in(z), remat)
    for level in self.up_blocks:
      h = level(h, scan, remat)
    return jax.nn.silu(self.conv_norm_out(h))


@MODELS.register("autoencoder_kl")
class AutoencoderKL(nnx.Module):
  CAPABILITIES = (
    contract.LOCAL_POSTERIOR,
    contract.POSTERIOR_DENSITY,
    contract.RECONSTRUCTION,
  )
  OUTPUT_LAYER = ("decoder", "conv_out")

  def __init__(
    self,
    *,
    image_shape,
    likelihood,
    rngs,
    dtype=jnp.float32,
    channels=128,
    channel_multipliers=(1, 2, 4, 4),
    num_res_blocks=2,
    attention_resolutions=(),
    latent_channels=4,
    use_quant_conv=True,
    norm_groups=32,
    dropout=0.0,
    learn_logvar=False,
    logvar_init=0.0,
    pad_to=0,
    remat=False,
    scan_blocks=False,
  ):
    height, width, colors = image_shape
    self.image_shape, self.likelihood, self.dtype = tuple(image_shape), likelihood, dtype
    multipliers = tuple(int(m) for m in channel_multipliers)
    widths = tuple(channels * m for m in multipliers)
    if not multipliers or min(widths) < 1 or latent_channels < 1 or num_res_blocks < 1:
      raise ConfigError(
        "model.channels, channel_multipliers, latent_channels and num_res_blocks must be "
        f"positive, got {channels}, {channel_multipliers}, {latent_channels}, {num_res_blocks}"
      )
    bad_groups = sorted({w for w in widths if w % norm_groups})
    if norm_groups < 1 or bad_groups:
      raise ConfigError(
        f"model.norm_groups {norm_groups} must divide every width (channels x multiplier): "
        f"{', '.join(map(str, bad_groups or widths))} do not divide"
      )
    if dropout:
      raise ConfigError(
        f"model.dropout {dropout}: autoencoder_kl supports only 0 (LDM's configs use 0; the "
        "contract's terms has no train/eval switch): set model.dropout=0"
      )
    factor = 2 ** (len(widths) - 1)
    padded = (max(pad_to, height), max(pad_to, width))
    if padded[0] % factor or padded[1] % factor:
      raise ConfigError(
        f"autoencoder_kl downsamples by {factor} ({len(widths)} channel_multipliers) but the "
        f"image is {padded[0]}x{padded[1]} (after pad_to): set model.pad_to to a multiple of "
        f"{factor} at least the image side"
      )
    self.padding = tuple(
      ((p - s) // 2, p - s - (p - s) // 2) for p, s in zip(padded, (height, width))
    )
    self.latent_hw = (padded[0] // factor, padded[1] // factor)
    self.latent_channels = latent_channels
    self.scan, self.remat = bool(scan_blocks), bool(remat)
    # The decoder's output: the mean only (plus LDM's scalar logvar) for laplace and gaussian,
    # whose raw layout is (mean, log-scale) per channel or the mean alone.
    self.raw_params = likelihood.channels_out(colors) // colors
    self.ldm_output = likelihood.name in MEAN_AND_SCALE
    if learn_logvar and not (self.ldm_output and self.raw_params == 2):
      raise ConfigError(
        "model.learn_logvar needs objective.likelihood laplace or gaussian with a learned "
        f"scale; got {likelihood.name} with {self.raw_params} raw channel(s) per image channel"
      )
    out_channels = colors if self.ldm_output else likelihood.channels_out(colors)
    # Attention where the feature map's height is in attention_resolutions (LDM's curr_res).
    resolutions = tuple(int(r) for r in attention_resolutions)
    attend = tuple(padded[0] // 2**i in resolutions for i in range(len(widths)))
    self.encoder = Encoder(
      colors, widths, num_res_blocks, attend, latent_channels, norm_groups, rngs, dtype
    )
    self.decoder = Decoder(
      out_channels, widths, num_res_blocks, attend, latent_channels, norm_groups, rngs, dtype
    )
    two_z = 2 * latent_channels
    self.quant_conv = conv(two_z, two_z, rngs, dtype, kernel=1) if use_quant_conv else None
    self.post_quant_conv = (
      conv(latent_channels, latent_channels, rngs, dtype, kernel=1) if use_quant_conv else None
    )
    self.logvar_init = float(logvar_init)
    if learn_logvar:
      self.logvar = nnx.Param(jnp.asarray(logvar_init, jnp.float32))

  # -- shapes ----------------------------------------------------------------------------
  @property
  def latent_shapes(self):
    return ((*self.latent_hw, self.latent_channels),)

  # -- the networks ----------------------------------------------------------------------
  def encode(self, x):
    """(mean, logvar) [b, h, w, c] float32 of q(z|x) for x in [0, 1]; logvar clamped."""
    (top, bottom), (left, right) = self.padding
    x11 = jnp.pad(2.0 * x - 1.0, ((0, 0), (top, bottom), (left, right), (0, 0)))
    moments = self.encoder(x11.astype(self.dtype), self.scan, self.remat)
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def features(self, z):
    """The decoder's last layer's input [b, H', W', F] (H', W' after pad_to) for z."""
    h = z.astype(self.dtype)
    if self.post_quant_conv is not None:
      h = self.post_quant_conv(h)
    return self.decoder.features(h, self.scan, self.remat)

  def output_layer(self, params, features):
    """raw [b, H, W, channels_out] from `features` through decoder.conv_out with the pure
    parameters `params` ({"kernel", "bias"}): the likelihood's mean and LDM's log-scale
    (module docstring), cropped to the image."""
    out = jax.lax.conv_general_dilated(
      features.astype(self.dtype),
      params["kernel"].astype(self.dtype),
      (1, 1),
      "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    out = (out + params["bias"].astype(self.dtype)).astype(jnp.float32)
    (top, bottom), (left, right) = self.padding
    if top or bottom or left or right:  # pad_to's zeros cropped off; any other size as it came
      height, width = self.image_shape[:2]
      out = out[:, top : top + height, left : left + width]
    if not self.ldm_output:
      return out
    mean = (out + 1.0) / 2.0
    if self.raw_params == 1:
      return mean
    logvar = self.logvar[...] if hasattr(self, "logvar") else jnp.float32(self.logvar_init)
    shift = math.log(2.0) if self.likelihood.name == "laplace" else 2.0 * math.log(2.0)
    log_scale = jnp.broadcast_to(logvar - shift, mean.shape)
    return jnp.stack([mean, log_scale], axis=-1).reshape(*mean.shape[:-1], -1)

  def decode(self, z):
    """Raw likelihood parameters [b, H, W, channels_out] for latents z [b, h, w, c]."""
    conv_out = self.decoder.conv_out
    params = {"kernel": conv_out.kernel[...], "bias": conv_out.bias[...]}
    return self.output_layer(params, self.features(z))

  # -- the posterior ---------------------------------------------------------------------
  def _layer(self, local, eps):
    """The latent layer for noise eps [k, b, h, w, c]: z and its LatentLayer (per-unit terms
    flattened to [k, b, units], the KL analytic)."""
    mean, logvar = local
    z = mean + jnp.exp(0.5 * logvar) * eps
    flat = lambda a: jnp.broadcast_to(a, z.shape).reshape(*z.shape[:2], -1)
    log_q = gaussian.log_normal_per_unit(z, mean, logvar)
    log_p = gaussian.log_normal_per_unit(z, 0.0, 0.0)
    layer = contract.LatentLayer(
      z=z,
      log_q=jnp.sum(flat(log_q), -1),
      log_p=jnp.sum(flat(log_p), -1),
      kl=flat(gaussian.kl_per_unit(mean, logvar)),
      q_mean=flat(mean),
    )
    return layer

  def encode_local(self, x):
    return self.encode(x)

  def terms_given(self, x, local, noise):
    layer = self._layer(local, noise.normal(0, self.latent_shapes[0]))
    k, b = layer.z.shape[:2]
    raw = self.decode(layer.z.reshape(k * b, *layer.z.shape[2:]))
    log_px_z = self.likelihood.log_prob(raw.reshape(k, b, *raw.shape[1:]), x)
    return contract.Terms(log_px_z, (layer,))

  def terms(self, x, noise):
    return self.terms_given(x, self.encode(x), noise)

  def reconstruct_for_training(self, x, noise):
    if noise.num_samples != 1:
      raise UsageError(
        f"reconstruct_for_training takes one posterior sample, got noise.num_samples "
        f"{noise.num_samples}: set objective.num_samples=1"
      )
    layer = self._layer(self.encode(x), noise.normal(0, self.latent_shapes[0]))
    features = self.features(layer.z[0])
    conv_out = self.decoder.conv_out
    raw = self.output_layer({"kernel": conv_out.kernel[...], "bias": conv_out.bias[...]}, features)
    return contract.Reconstruction(raw, (layer,), features)

  # -- the rest of the contract ----------------------------------------------------------
  def log_prior(self, zs):
    return gaussian.log_standard_normal(zs[0].reshape(zs[0].shape[0], -1))

  def log_joint(self, x, zs):
    return self.likelihood.log_prob(self.decode(zs[0]), x) + self.log_prior(zs)

  def log_posterior(self, x, zs):
    mean, logvar = self.encode(x)
    flat = lambda a: a.reshape(a.shape[0], -1)
    return gaussian.log_normal(flat(zs[0]), flat(mean), flat(logvar))

  def prior_sample(self, key, n):
    return (jax.random.normal(key, (n, *self.latent_shapes[0])),)

  def generate(self, zs):
    return self.decode(zs[0])

  def sample(self, key, n, temperature=1.0):
    t = jnp.asarray(temperature, jnp.float32).reshape(-1)[0]
    return self.decode(t * self.prior_sample(key, n)[0])

  def reconstruct(self, x, noise, keep_layers=1):
    """keep_layers >= 1: z from q(z|x); 0: from the prior (a sample unrelated to x)."""
    eps = noise.normal(0, self.latent_shapes[0])
    z = self._layer(self.encode(x), eps).z[0] if keep_layers else eps[0]
    return self.decode(z)
