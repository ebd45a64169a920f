"""A very deep hierarchical VAE of the VDVAE family (Child 2021; Hazami et al. 2022).

A bottom-up residual encoder keeps one activation per resolution. A top-down decoder runs
groups of latent layers per resolution, from 1x1 up to the image; each layer reads the
residual state x and
    q(z_l | z_<l, x) = N(mean, std) from a block over [x, encoder activation at this resolution]
    p(z_l | z_<l)    = N(mean, std) from a block over x, which also emits features added to x
then adds a 1x1 projection of the sample z_l to x and applies a residual block. Blocks are
bottleneck residual blocks (1x1, 3x3, 3x3, 1x1 convolutions, pre-activation; 1x1 throughout
at resolutions <= 2). Stable initialisation: the prior's last convolution starts at zero (p is
N(0, I) and adds nothing at first), and the last convolution of every residual block and of
the z projections is scaled by sqrt(1 / depth). Standard deviations are softplus with
beta = ln 2 (std 1 at 0; Efficient-VDVAE's smoother replacement of VDVAE's exp(log sigma),
the usual NaN source).

Depth without cost: the layers of one resolution are identical, so their parameters are
stored stacked (one leading axis per group) and run either with `lax.scan` over the stack
(`scan_blocks="scan"`: one compiled body, whatever the depth; the choice on accelerators) or
unrolled (`"unroll"`: XLA:CPU runs convolutions inside a rolled loop many times slower;
"auto" picks by backend). Both read the same
parameters, so they compute the same numbers and share checkpoints. `remat` recomputes each
layer's activations in the backward pass instead of storing them.

Specs, as strings so they fit in a config and on a command line (resolution:count, top-down
order for the decoder, bottom-up for the encoder; widths per resolution):
    dec_layers "1:5,4:5,8:10,16:2,32:1"   enc_blocks "32:1,16:2,8:10,4:5,1:5"
    widths     "32:32,16:64,8:128,4:256,1:512"   (or one number for every resolution)
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from flaxvae.errors import ConfigError
from flaxvae.models import contract, layers
from flaxvae.models.registry import MODELS
from flaxvae.objectives import elementwise
from flaxvae.runtime import backend

STD_BETA = math.log(2.0)  # softplus_beta(0) = 1
MIN_STD_INPUT = -20.0  # below this the softplus std underflows float32


def parse_counts(spec, what):
  """ "1:5,4:5" -> [(1, 5), (4, 5)]; a one-line ConfigError otherwise."""
  try:
    pairs = [tuple(int(v) for v in part.split(":")) for part in str(spec).split(",") if part]
    if not pairs or any(len(p) != 2 or p[0] <= 0 or p[1] < 0 for p in pairs):
      raise ValueError
  except ValueError:
    raise ConfigError(
      f"model.{what} {spec!r} is not a list of resolution:count pairs (e.g. '1:5,4:5,8:10')"
    ) from None
  return pairs


def parse_widths(spec, resolutions):
  if isinstance(spec, int) or str(spec).isdigit():
    return {r: int(spec) for r in resolutions}
  widths = dict(parse_counts(spec, "widths"))
  missing = sorted(set(resolutions) - set(widths))
  if missing:
    raise ConfigError(f"model.widths {spec!r} gives no width for resolution(s) {missing}")
  return widths


def std_of(raw):
  """softplus_beta(raw) and its log, floored so neither underflows."""
  raw = jnp.maximum(raw.astype(jnp.float32), MIN_STD_INPUT)
  std = elementwise.softplus(STD_BETA * raw) / STD_BETA
  return std, jnp.log(std)


def gaussian_log_density(z, mean, log_std):
  return -0.5 * (math.log(2 * math.pi) + 2 * log_std + ((z - mean) * jnp.exp(-log_std)) ** 2)


def gaussian_kl(q_mean, q_log_std, p_mean, p_log_std):
  """KL(N(q) || N(p)) per unit, from log standard deviations."""
  ratio = jnp.exp(2 * (q_log_std - p_log_std))
  return (
    0.5 * (ratio + ((q_mean - p_mean) * jnp.exp(-p_log_std)) ** 2 - 1.0) + p_log_std - q_log_std
  )


class Block(nnx.Module):
  """Pre-activation bottleneck block: 1x1, kxk, kxk, 1x1; residual if in == out channels."""

  def __init__(self, cin, mid, cout, kernel, act, rngs, dtype, residual, last_scale=1.0):
    conv = lambda i, o, k: layers.conv(i, o, rngs, dtype, kernel=k)
    self.act, self.residual = act, residual
    self.c1, self.c2, self.c3, self.c4 = (
      conv(cin, mid, 1),
      conv(mid, mid, kernel),
      conv(mid, mid, kernel),
      conv(mid, cout, 1),
    )
    self.c4.kernel[...] = self.c4.kernel[...] * last_scale

  def __call__(self, x):
    h = self.c4(self.act(self.c3(self.act(self.c2(self.act(self.c1(self.act(x))))))))
    return x + h if self.residual else h


class DecoderLayer(nnx.Module):
  """One latent layer of the top-down pass (see the module docstring)."""

  def __init__(self, width, mid, latent, kernel, act, out_scale, rngs, dtype):
    self.latent = latent
    self.posterior = Block(2 * width, mid, 2 * latent, kernel, act, rngs, dtype, residual=False)
    self.prior = Block(
      width, mid, 2 * latent + width, kernel, act, rngs, dtype, residual=False, last_scale=0.0
    )
    self.z_proj = layers.conv(latent, width, rngs, dtype, kernel=1)
    self.z_proj.kernel[...] = self.z_proj.kernel[...] * out_scale
    self.resnet = Block(
      width, mid, width, kernel, act, rngs, dtype, residual=True, last_scale=out_scale
    )


class EncoderBlock(nnx.Module):
  def __init__(self, width, mid, kernel, act, out_scale, rngs, dtype):
    self.block = Block(
      width, mid, width, kernel, act, rngs, dtype, residual=True, last_scale=out_scale
    )


def stacked(make, count):
  """`count` modules from `make(i)`, stored as one module whose arrays have a leading axis.

  Built from shapes alone (layers.shapes_only: ahead-of-time compiles, the depth bench), the
  stack is the first module's shapes repeated: tracing every module would cost time quadratic
  in depth (each Flax variable write on a tracer builds an error message that walks the whole
  jaxpr so far), minutes per build at 64 layers. Built for real, or traced under jit, each module
  draws its own initialisation."""
  first = make(0)
  graphdef, state = nnx.split(first)
  if layers.building_shapes_only():
    return nnx.merge(
      graphdef, jax.tree.map(lambda a: jnp.broadcast_to(a, (count, *a.shape)), state)
    )
  states = [state] + [nnx.split(make(i))[1] for i in range(1, count)]
  return nnx.merge(graphdef, jax.tree.map(lambda *a: jnp.stack(a), *states))


def run_stack(stack, x, xs, body, scan, remat):
  """body(module, x, x_i) -> (x, y_i) over the stacked modules: scanned or unrolled."""
  graphdef, state = nnx.split(stack)
  step = lambda carry, inputs: body(nnx.merge(graphdef, inputs[0]), carry, inputs[1])
  if remat:
    step = jax.checkpoint(step)
  count = jax.tree.leaves(state)[0].shape[0]
  if scan:
    return jax.lax.scan(step, x, (state, xs))
  ys = []
  for i in range(count):
    x, y = step(x, jax.tree.map(lambda a: a[i], (state, xs)))  # noqa: B023  (called at once)
    ys.append(y)
  return x, jax.tree.map(lambda *a: jnp.stack(a), *ys)


def avg_pool(x, factor):
  b, h, w, c = x.shape
  return x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def upsample(x, factor):
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


@MODELS.register("vdvae")
class VDVAE(nnx.Module):
  CAPABILITIES = (contract.POSTERIOR_DENSITY,)

  def __init__(
    self,
    *,
    image_shape,
    likelihood,
    rngs,
    dtype=jnp.float32,
    dec_layers="1:5,4:5,8:10,16:2,32:1",
    enc_blocks="32:1,16:2,8:10,4:5,1:5",
    widths="32:32,16:64,8:128,4:256,1:512",
    bottleneck=1.0,
    latent_channels=32,
    pad_to=32,
    activation="gelu",
    scan_blocks="auto",
    remat=False,
    bias_max_resolution=64,
  ):
    height, width, colors = image_shape
    self.image_shape, self.likelihood, self.dtype = image_shape, likelihood, dtype
    self.act = layers.ACTIVATIONS[activation]
    side = max(pad_to, height, width)
    if height != width:
      raise ConfigError(f"vdvae needs square images, got {height}x{width}")
    self.side, self.pad = side, (side - height) // 2
    # Static attributes are tuples: the graphdef must hash (it is a jit static argument).
    self.dec_spec = tuple(parse_counts(dec_layers, "dec_layers"))
    self.enc_spec = tuple(parse_counts(enc_blocks, "enc_blocks"))
    resolutions = sorted({r for r, _ in (*self.dec_spec, *self.enc_spec)})
    for r in resolutions:
      if side % r:
        raise ConfigError(f"vdvae resolution {r} does not divide the (padded) image side {side}")
    if self.dec_spec[-1][0] != side or self.enc_spec[0][0] != side:
      raise ConfigError(
        f"model.dec_layers must end and model.enc_blocks start at the image "
        f"side {side} (after pad_to)"
      )
    missing = sorted({r for r, _ in self.dec_spec} - {r for r, _ in self.enc_spec})
    if missing:
      raise ConfigError(
        f"model.enc_blocks has no blocks at resolution(s) {missing}, which the "
        "decoder's posteriors read"
      )
    width_of = parse_widths(widths, resolutions)
    self.widths = tuple(sorted(width_of.items()))
    self.latent_channels = latent_channels
    if scan_blocks not in ("auto", "scan", "unroll"):
      raise ConfigError(f"model.scan_blocks must be auto, scan or unroll, got {scan_blocks!r}")
    if scan_blocks == "auto":
      scan_blocks = backend.scan_blocks_default()
    self.scan, self.remat = scan_blocks == "scan", bool(remat)
    num_dec = sum(n for _, n in self.dec_spec)
    num_enc = sum(n for _, n in self.enc_spec)
    mid = lambda r: max(1, int(width_of[r] * bottleneck))
    kernel = lambda r: 3 if r > 2 else 1
    # Encoder: input conv, then per resolution a stack of blocks, pooled to the next.
    self.enc_in = layers.conv(colors, width_of[side], rngs, dtype)
    self.enc_groups = nnx.List(
      [
        stacked(
          lambda i, r=r: EncoderBlock(
            width_of[r], mid(r), kernel(r), self.act, math.sqrt(1 / num_enc), rngs, dtype
          ),
          n,
        )
        for r, n in self.enc_spec
      ]
    )
    self.enc_proj = nnx.List(
      [
        layers.conv(width_of[r], width_of[nxt], rngs, dtype, kernel=1)
        if width_of[r] != width_of[nxt]
        else None
        for (r, _), (nxt, _) in zip(self.enc_spec[:-1], self.enc_spec[1:])
      ]
    )
    # Decoder: a learned start per resolution, a stack of latent layers per group.
    # (VDVAE learns no start above 64x64: at 256x256 it would be most of the parameters.)
    self.dec_bias = nnx.List(
      [
        nnx.Param(jnp.zeros((1, r, r, width_of[r]), jnp.float32))
        if r <= bias_max_resolution
        else None
        for r, _ in self.dec_spec
      ]
    )
    self.dec_proj = nnx.List(
      [
        layers.conv(width_of[prev], width_of[r], rngs, dtype, kernel=1)
        if width_of[prev] != width_of[r]
        else None
        for (prev, _), (r, _) in zip(self.dec_spec[:-1], self.dec_spec[1:])
      ]
    )
    self.dec_groups = nnx.List(
      [
        stacked(
          lambda i, r=r: DecoderLayer(
            width_of[r],
            mid(r),
            latent_channels,
            kernel(r),
            self.act,
            math.sqrt(1 / num_dec),
            rngs,
            dtype,
          ),
          n,
        )
        for r, n in self.dec_spec
      ]
    )
    self.out_gain = nnx.Param(jnp.ones((width_of[side],), jnp.float32))
    self.out_bias = nnx.Param(jnp.zeros((width_of[side],), jnp.float32))
    self.to_output = layers.conv(
      width_of[side], likelihood.channels_out(colors), rngs, dtype, kernel=1
    )

  # -- shapes ----------------------------------------------------------------------------
  @property
  def latent_shapes(self):
    return tuple((r, r, self.latent_channels) for r, n in self.dec_spec for _ in range(n))

  @property
  def num_layers(self):
    return sum(n for _, n in self.dec_spec)

  # -- the two passes ----------------------------------------------------------------------
  def encode_activations(self, x):
    """{resolution: the last encoder activation there} for preprocessed x [b, H, W, C]."""
    p = self.pad
    h = jnp.pad(2.0 * x - 1.0, ((0, 0), (p, p), (p, p), (0, 0))).astype(self.dtype)
    h = self.enc_in(h)
    acts = {}
    body = lambda block, h, _: (block.block(h), None)
    for i, ((r, _), group) in enumerate(zip(self.enc_spec, self.enc_groups)):
      h, _ = run_stack(group, h, None, body, self.scan, self.remat)
      acts[r] = h
      if i + 1 < len(self.enc_spec):
        h = avg_pool(h, r // self.enc_spec[i + 1][0])
        if self.enc_proj[i] is not None:
          h = self.enc_proj[i](h)
    return acts

  def _decode(self, batch, *, eps, acts=None, given=None, use_posterior=None, temperature=None):
    """The top-down pass over `batch` rows; returns (raw likelihood parameters, per-layer stats).

    eps: per layer [batch, r, r, c] standard-normal noise; acts: the encoder's activations
    (encode_activations), without which q is not computed; given: per-layer latents that
    replace the samples; use_posterior: per-layer floats, 1 to sample q (needs acts), 0 to
    sample the prior (default: q wherever acts are given); temperature: per-layer scales of the
    prior's standard deviations (default 1). Stats per layer: z, log_q, log_p, kl, q_mean
    ([batch, ...]).
    """
    if use_posterior is None:
      use_posterior = [1.0 if acts is not None else 0.0] * self.num_layers
    if temperature is None:
      temperature = [1.0] * self.num_layers
    x, first, stats = None, 0, []
    for g, ((r, n), group) in enumerate(zip(self.dec_spec, self.dec_groups)):
      bias = self.dec_bias[g]
      start = jnp.broadcast_to(
        bias[...].astype(self.dtype) if bias is not None else jnp.zeros((), self.dtype),
        (batch, r, r, dict(self.widths)[r]),
      )
      if x is None:
        x = start
      else:
        up = upsample(x, r // self.dec_spec[g - 1][0])
        x = start + (self.dec_proj[g - 1](up) if self.dec_proj[g - 1] is not None else up)
      act = acts[r] if acts is not None else None
      xs = dict(
        eps=jnp.stack(eps[first : first + n]),
        select=jnp.asarray(use_posterior[first : first + n], jnp.float32),
        temperature=jnp.asarray(temperature[first : first + n], jnp.float32),
      )
      if given is not None:
        xs["given"] = jnp.stack(given[first : first + n])
      body = lambda layer, x, inputs, act=act: self._layer(layer, x, act, inputs)
      x, out = run_stack(group, x, xs, body, self.scan, self.remat)
      stats.extend(jax.tree.map(lambda a, i=i: a[i], out) for i in range(n))
      first += n
    h = x.astype(jnp.float32) * self.out_gain[...] + self.out_bias[...]
    raw = self.to_output(h.astype(self.dtype)).astype(jnp.float32)
    p = self.pad
    return raw[:, p : self.side - p, p : self.side - p], stats

  def _layer(self, layer, x, act, inputs):
    c = self.latent_channels
    prior = layer.prior(x).astype(jnp.float32)
    p_mean, (p_std, p_log_std) = prior[..., :c], std_of(prior[..., c : 2 * c])
    eps, t = inputs["eps"].astype(jnp.float32), inputs["temperature"]
    z = p_mean + p_std * t * eps
    if act is not None:  # q reads the state before the prior's features are added
      q = layer.posterior(jnp.concatenate([x, act.astype(x.dtype)], axis=-1)).astype(jnp.float32)
      q_mean, (q_std, q_log_std) = q[..., :c], std_of(q[..., c:])
      z = jnp.where(inputs["select"] > 0, q_mean + q_std * eps, z)
    if "given" in inputs:
      z = inputs["given"].astype(jnp.float32)
    log_p = gaussian_log_density(z, p_mean, p_log_std)
    if act is not None:
      log_q = gaussian_log_density(z, q_mean, q_log_std)
      kl = gaussian_kl(q_mean, q_log_std, p_mean, p_log_std)
    else:
      log_q = kl = q_mean = jnp.zeros_like(z)
    x = x + prior[..., 2 * c :].astype(x.dtype)
    x = layer.resnet(x + layer.z_proj(z.astype(self.dtype)))
    flat = lambda a: a.reshape(a.shape[0], -1)
    return x, dict(
      z=z,
      log_q=jnp.sum(flat(log_q), -1),
      log_p=jnp.sum(flat(log_p), -1),
      kl=flat(kl),
      q_mean=flat(q_mean),
    )

  def _eps(self, noise):
    """Per layer [k * b, r, r, c] noise, from `noise` (layer l draws stream l)."""
    return [
      noise.normal(l, shape).reshape(-1, *shape) for l, shape in enumerate(self.latent_shapes)
    ]

  def _repeat(self, acts, k):
    return {r: jnp.tile(a, (k, 1, 1, 1)) for r, a in acts.items()}

  # -- the contract ----------------------------------------------------------------------
  def terms(self, x, noise):
    k, b = noise.num_samples, x.shape[0]
    acts = self._repeat(self.encode_activations(x), k)
    raw, stats = self._decode(k * b, eps=self._eps(noise), acts=acts)
    log_px_z = self.likelihood.log_prob(raw.reshape(k, b, *raw.shape[1:]), x)
    unflat = lambda a: a.reshape(k, b, *a.shape[1:])
    layers_out = tuple(
      contract.LatentLayer(*(unflat(s[f]) for f in contract.LatentLayer._fields)) for s in stats
    )
    return contract.Terms(log_px_z, layers_out)

  def _given(self, zs):
    """The top-down pass with every latent given: (raw, stats)."""
    return self._decode(zs[0].shape[0], eps=[jnp.zeros_like(z) for z in zs], given=list(zs))

  def log_joint(self, x, zs):
    raw, stats = self._given(zs)
    return self.likelihood.log_prob(raw, x) + sum(s["log_p"] for s in stats)

  def log_prior(self, zs):
    return sum(s["log_p"] for s in self._given(zs)[1])

  def generate(self, zs):
    return self._given(zs)[0]

  def prior_sample(self, key, n):
    keys = jax.random.split(key, self.num_layers)
    eps = [jax.random.normal(kk, (n, *s)) for kk, s in zip(keys, self.latent_shapes)]
    _, stats = self._decode(n, eps=eps)
    return tuple(s["z"] for s in stats)

  def log_posterior(self, x, zs):
    _, stats = self._decode(
      x.shape[0],
      eps=[jnp.zeros_like(z) for z in zs],
      acts=self.encode_activations(x),
      given=list(zs),
    )
    return sum(s["log_q"] for s in stats)

  def _temperatures(self, temperature):
    t = jnp.asarray(temperature, jnp.float32).reshape(-1)
    if t.shape[0] not in (1, self.num_layers):
      raise ConfigError(
        f"give one temperature or one per latent layer ({self.num_layers}), got {t.shape[0]}"
      )
    return list(jnp.broadcast_to(t, (self.num_layers,)))

  def sample(self, key, n, temperature=1.0):
    keys = jax.random.split(key, self.num_layers)
    eps = [jax.random.normal(kk, (n, *s)) for kk, s in zip(keys, self.latent_shapes)]
    raw, _ = self._decode(n, eps=eps, temperature=self._temperatures(temperature))
    return raw

  def reconstruct(self, x, noise, keep_layers=None):
    keep = self.num_layers if keep_layers is None else keep_layers
    select = [1.0 if l < keep else 0.0 for l in range(self.num_layers)]
    raw, _ = self._decode(
      x.shape[0], eps=self._eps(noise), acts=self.encode_activations(x), use_posterior=select
    )
    return raw
