"""Output likelihoods p(x | decoder output) for images, as pure functions of arrays.

Conventions
-----------
* Data `x` have shape [batch, H, W, C] (any leading axes broadcast) with values in
  [0, 1]: 8-bit data are k/255, binary data are 0/1.
* The decoder emits `raw` of shape [..., batch, H, W, channels_out(C)]; the leading
  axes (e.g. k posterior samples) are free and broadcast against `x`.
* `log_prob(raw, x)` is log p(x | raw) summed over H, W and C: float32 [..., batch], in
  nats. Arithmetic is float32 whatever the dtype of `raw` (bfloat16 decoders included).
* Raw channels are channel-major: for the channel-independent families, the P numbers of
  data channel c are raw[..., c*P:(c+1)*P] (so a [..., H, W, C, P] decoder output
  reshaped to [..., H, W, C*P] is the same layout). Their log_prob reshapes to
  [..., batch, H*W*C, P] before the elementwise math: XLA:CPU fuses and vectorizes that
  far better than the same math over [H, W, C].

Families (`get_likelihood(name, **options)`)
--------------------------------------------
bernoulli             P = 1: logits. A pmf on {0, 1} ("binary"); on grey values in
                      [0, 1] it is the negative binary cross-entropy, not a likelihood.
gaussian              P = 2: mean, log-variance; or P = 1 (the mean) with the fixed
                      option `gaussian_logvar`. A density ("continuous").
laplace               P = 2: mean, log-scale b (density exp(-|x - mean| / b) / 2b); or
                      P = 1 (the mean) with the fixed option `laplace_log_scale`. A density
                      ("continuous"). LDM's L1 nll |x' - out| / exp(logvar) + logvar in
                      [-1, 1] units (x' = 2x - 1) is exactly -log p of mean = (out + 1) / 2
                      and log b = logvar - log 2 (the Jacobian's log 2 cancels the log 2b).
discretized_logistic  P = 2: mean, log-scale, in [0, 1] data units (as flaxvae.losses):
                      the logistic mass of x's bin [x - 1/510, x + 1/510], the edge bins
                      0 and 255 taking the tails. log-scale is clamped below at -7.
mixture_logistic      The discretized mixture of logistics of PixelCNN++ (Salimans et
                      al., 2017) and VDVAE, with `num_mixtures` M components, in PixelCNN++'s
                      [-1, 1] units (x' = 2x - 1; bins of width 2/255, so a clamp of -7 and
                      the coupling coefficients mean what they mean there). Per pixel:
                          raw[..., :M]                     mixture logits
                          raw[..., M:].reshape(C, P*M)     per channel c: M means, M
                                                           log-scales (clamped below at -7)
                                                           and, for C == 3, M coupling
                                                           coefficients (through tanh)
                      so channels_out(3) = 10 M (PixelCNN++'s layout) and channels_out(C)
                      = M (1 + 2C) for C != 3, whose channels are independent given the
                      component. For RGB, within component m (coefficients a, b, c =
                      the tanh of channel R's, G's and B's coefficient slots):
                          mean_R = mu_R,  mean_G = mu_G + a x'_R,  mean_B = mu_B + b x'_R + c x'_G
                      i.e. p_m(R) p_m(G | R) p_m(B | R, G), which sums to 1 over the 256^3
                      colours; p = sum_m softmax(logits)_m p_m (a logsumexp over components).

The bin masses (`bin_mass` option of both discretized families)
---------------------------------------------------------------
"exact" (default): log of F(x + h) - F(x - h) for the logistic CDF F = sigmoid and half
bin width h, through the identity (a > b)

    sigmoid(a) - sigmoid(b) = sigmoid(a) * sigmoid(-b) * (1 - exp(-(a - b)))

    log mass = log_sigmoid(plus) - softplus(minus) + log1mexp((2h) / scale),

with plus/minus = (x -/+ mean +/- h) / scale. Every term is a stable function of its
argument, so the mass is accurate to float32 rounding everywhere (far tails included,
where the difference of two CDFs cancels or underflows) and never needs a fallback; the
edge bins are log_sigmoid(plus) (bin 0) and -softplus(minus) (bin 255).
"pixelcnn": PixelCNN++'s arithmetic, for comparison with published numbers: the CDF
difference sigmoid(plus) - sigmoid(minus), and where it is below 1e-5 the density at the
bin centre times the bin width (log_pdf_mid). Finite too, but in the tails that midpoint
rule underestimates the mass of a sharp logistic's bin: at the -7 clamp by 2.15 nats per
dimension for mixture_logistic (a bin 8.6 scales wide) and 0.68 for discretized_logistic
(4.3 scales); and the CDF difference loses precision to cancellation near F = 1.

Sampling and means
------------------
`sample(key, raw, temperature=1.0)` returns values in the data's value set: {0, 1} for
bernoulli, the 256 levels k/255 for the discretized families (a logistic draw with scale *
temperature, rounded to its bin, the edge bins taking the tails: an exact draw from the pmf
at temperature 1), and for the Gaussian and the Laplace a draw clipped to [0, 1]. Temperature
0 gives the mode of the drawn component. For bernoulli, temperature T samples
sigmoid(logits / T). The mixture draws a component by Gumbel-max on the (untempered) logits,
then R, G and B in turn, each coupled to the already *quantized* R (and G): exactly the order
and values that log_prob conditions on.
`mean(raw)` is the expected image for grids: sigmoid(logits); the Gaussian's (Laplace's)
mean, unclipped; the clipped logistic mean; for the mixture the softmax-weighted mean of the
per-component coupled means (each clipped to the data range), in [0, 1].
"""

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from flaxvae.objectives import elementwise

NUM_LEVELS = 256
LOG_SCALE_MIN = -7.0  # PixelCNN++'s clamp on logistic log-scales
LOG_2PI = math.log(2 * math.pi)
BIN_MASSES = ("exact", "pixelcnn")


class Likelihood(NamedTuple):
  """An output family for images x [batch, H, W, C] in [0, 1] (see the module docstring).

  name          the registry name.
  channels_out  C -> how many raw decoder channels per pixel the family needs.
  log_prob      (raw [..., batch, H, W, channels_out], x [batch, H, W, C]) -> float32
                [..., batch]: log p(x | raw) summed over H, W, C.
  mean          raw -> [..., batch, H, W, C], the expected image (for grids).
  sample        (key, raw, temperature=1.0) -> [..., batch, H, W, C] in the data's value set.
  discrete      whether log_prob is a probability mass over the data's value set (then
                NLL and bits per dim are meaningful).
  data_kind     "binary" (a pmf only on {0, 1}), "8bit" (a pmf over the 256 levels k/255)
                or "continuous" (a density).
  """

  name: str
  channels_out: Callable[[int], int]
  log_prob: Callable
  mean: Callable
  sample: Callable
  discrete: bool
  data_kind: str


# ---------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------
def _check_channels(num_channels):
  if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
    raise ValueError(f"the number of data channels must be a positive int, got {num_channels!r}")
  return num_channels


def _check_shapes(name, channels_out, raw, x):
  """raw [..., batch, H, W, K] against x [..., batch, H, W, C]; K must be channels_out(C)."""
  if raw.ndim < 4 or x.ndim < 4:
    raise ValueError(
      f"{name}: raw must be [..., batch, H, W, channels] and x [batch, H, W, C], "
      f"got raw {raw.shape} and x {x.shape}"
    )
  want = channels_out(x.shape[-1])
  if raw.shape[-3:-1] != x.shape[-3:-1] or raw.shape[-1] != want:
    raise ValueError(
      f"{name}: raw {raw.shape} does not fit x {x.shape}: want raw "
      f"[..., batch, {x.shape[-3]}, {x.shape[-2]}, {want}]"
    )


def _flat_dims(raw, x, params):
  """raw -> float32 [..., batch, H*W*C, params] and x -> float32 [..., batch, H*W*C]."""
  dims = math.prod(x.shape[-3:])
  raw = raw.astype(jnp.float32).reshape(*raw.shape[:-3], dims, params)
  return raw, x.astype(jnp.float32).reshape(*x.shape[:-3], dims)


def _per_channel(raw, params):
  """raw [..., H, W, C*params] -> [..., H, W, C, params]."""
  if raw.shape[-1] % params:
    raise ValueError(f"raw has {raw.shape[-1]} channels, not a multiple of {params}")
  return raw.reshape(*raw.shape[:-1], raw.shape[-1] // params, params)


def _to_levels(v, scale):
  """Values in [0, 1] units times `scale` (255) -> the nearest of the 256 level indices."""
  return jnp.clip(jnp.round(v * scale), 0.0, NUM_LEVELS - 1.0)


# ---------------------------------------------------------------------------
# The discretized logistic mass of one bin
# ---------------------------------------------------------------------------
def _log1mexp(log_d):
  """log(1 - exp(-d)) for d = exp(log_d) > 0, accurate and with finite gradients for any d.

  Tiny d: log d - d/2 (the series, from log_d, so d may underflow); d <= log 2:
  log(-expm1(-d)); larger d: log1p(-exp(-d)) (Maechler's split).
  """
  d = jnp.exp(log_d)
  tiny = d < 1e-3
  d_safe = jnp.where(tiny, 1.0, d)  # keeps the unused branches (and their gradients) finite
  return jnp.where(
    tiny,
    log_d - 0.5 * d,
    jnp.where(d_safe <= math.log(2.0), jnp.log(-jnp.expm1(-d_safe)), jnp.log1p(-jnp.exp(-d_safe))),
  )


def _discretized_logistic_log_mass(x, mean, log_scale, half_bin, low, high, bin_mass):
  """log of the logistic(mean, exp(log_scale)) mass of the bin [x - half_bin, x + half_bin].

  The lowest bin (x < low) takes (-inf, x + half_bin], the highest (x > high) takes
  [x - half_bin, inf). log_scale must already be clamped. See the module docstring for
  the two `bin_mass` forms.
  """
  inv_scale = jnp.exp(-log_scale)
  centred = x - mean
  plus = inv_scale * (centred + half_bin)
  minus = inv_scale * (centred - half_bin)
  log_cdf_plus = elementwise.log_sigmoid(plus)  # log F(upper edge): the lowest bin
  log_sf_minus = -elementwise.softplus(minus)  # log(1 - F(lower edge)): the highest bin
  if bin_mass == "exact":
    interior = log_cdf_plus + log_sf_minus + _log1mexp(math.log(2.0 * half_bin) - log_scale)
  else:  # PixelCNN++
    cdf_delta = jax.nn.sigmoid(plus) - jax.nn.sigmoid(minus)
    mid = inv_scale * centred
    log_pdf_mid = mid - log_scale - 2.0 * elementwise.softplus(mid) + math.log(2.0 * half_bin)
    interior = jnp.where(cdf_delta > 1e-5, jnp.log(jnp.maximum(cdf_delta, 1e-12)), log_pdf_mid)
  return jnp.where(x < low, log_cdf_plus, jnp.where(x > high, log_sf_minus, interior))


# ---------------------------------------------------------------------------
# Bernoulli
# ---------------------------------------------------------------------------
def _bernoulli():
  """Bernoulli(sigmoid(logits)) per dimension, one logit per data channel."""
  name = "bernoulli"
  channels_out = lambda c: _check_channels(c)

  def log_prob(raw, x):
    _check_shapes(name, channels_out, raw, x)
    logits, x = _flat_dims(raw, x, 1)
    logits = logits[..., 0]
    return jnp.sum(x * logits - elementwise.softplus(logits), axis=-1)

  def mean(raw):
    return jax.nn.sigmoid(raw.astype(jnp.float32))

  def sample(key, raw, temperature=1.0):
    logits = raw.astype(jnp.float32)
    # 1 iff logits + T * Logistic > 0: Bernoulli(sigmoid(logits / T)); the mode at T = 0.
    noise = jax.random.logistic(key, logits.shape, jnp.float32)
    return (logits + temperature * noise > 0).astype(jnp.float32)

  return Likelihood(name, channels_out, log_prob, mean, sample, True, "binary")


# ---------------------------------------------------------------------------
# Gaussian
# ---------------------------------------------------------------------------
def _location_scale(name, fixed, log_density, scale_of, draw):
  """A continuous family with (location, log-scale) per channel, or the location alone with
  the log-scale `fixed`: log_density(x, mu, s) per dimension, scale_of(s) the factor of
  draw(key, shape)'s standard noise in a sample (clipped to [0, 1])."""
  params = 2 if fixed is None else 1
  channels_out = lambda c: params * _check_channels(c)

  def second(raw):
    return raw[..., 1] if fixed is None else jnp.float32(fixed)

  def split(raw):
    raw = _per_channel(raw.astype(jnp.float32), params)
    return raw[..., 0], second(raw)

  def log_prob(raw, x):
    _check_shapes(name, channels_out, raw, x)
    raw, x = _flat_dims(raw, x, params)
    return jnp.sum(log_density(x, raw[..., 0], second(raw)), axis=-1)

  def mean(raw):
    return split(raw)[0]

  def sample(key, raw, temperature=1.0):
    mu, s = split(raw)
    return jnp.clip(mu + scale_of(s) * temperature * draw(key, mu.shape), 0.0, 1.0)

  return Likelihood(name, channels_out, log_prob, mean, sample, False, "continuous")


def _gaussian(gaussian_logvar=None):
  """N(mean, exp(logvar)) per dimension: (mean, logvar) per channel, or the mean alone
  with a fixed log-variance."""
  return _location_scale(
    "gaussian",
    gaussian_logvar,
    lambda x, mu, logvar: -0.5 * (LOG_2PI + logvar + (x - mu) ** 2 * jnp.exp(-logvar)),
    lambda logvar: jnp.exp(0.5 * logvar),
    lambda key, shape: jax.random.normal(key, shape, jnp.float32),
  )


# ---------------------------------------------------------------------------
# Laplace (LDM's L1 reconstruction with its scalar log-variance)
# ---------------------------------------------------------------------------
def _laplace(laplace_log_scale=None):
  """Laplace(mean, b) per dimension: (mean, log b) per channel, or the mean alone with a fixed
  log-scale (module docstring: LDM's nll)."""
  return _location_scale(
    "laplace",
    laplace_log_scale,
    lambda x, mu, log_b: -(jnp.abs(x - mu) * jnp.exp(-log_b) + log_b + math.log(2.0)),
    jnp.exp,
    lambda key, shape: jax.random.laplace(key, shape, jnp.float32),
  )


# ---------------------------------------------------------------------------
# Discretized logistic, one per channel, in [0, 1] units
# ---------------------------------------------------------------------------
def _discretized_logistic(bin_mass="exact"):
  """One logistic per channel (mean, log-scale in [0, 1] units), discretized to 256 bins."""
  name = "discretized_logistic"
  channels_out = lambda c: 2 * _check_channels(c)
  half_bin = 0.5 / (NUM_LEVELS - 1)

  def split(raw):
    raw = _per_channel(raw.astype(jnp.float32), 2)
    return raw[..., 0], jnp.maximum(raw[..., 1], LOG_SCALE_MIN)

  def log_prob(raw, x):
    _check_shapes(name, channels_out, raw, x)
    raw, x = _flat_dims(raw, x, 2)
    log_mass = _discretized_logistic_log_mass(
      x,
      raw[..., 0],
      jnp.maximum(raw[..., 1], LOG_SCALE_MIN),
      half_bin,
      half_bin,
      1.0 - half_bin,
      bin_mass,
    )
    return jnp.sum(log_mass, axis=-1)

  def mean(raw):
    return jnp.clip(split(raw)[0], 0.0, 1.0)

  def sample(key, raw, temperature=1.0):
    mu, log_scale = split(raw)
    noise = jax.random.logistic(key, mu.shape, jnp.float32)
    v = mu + jnp.exp(log_scale) * temperature * noise
    return _to_levels(v, NUM_LEVELS - 1.0) / (NUM_LEVELS - 1.0)

  return Likelihood(name, channels_out, log_prob, mean, sample, True, "8bit")


# ---------------------------------------------------------------------------
# Discretized mixture of logistics (PixelCNN++), in [-1, 1] units
# ---------------------------------------------------------------------------
def _mixture_logistic(num_mixtures=10, bin_mass="exact"):
  """PixelCNN++'s discretized mixture of logistics with RGB coupling (module docstring).

  Internally the raw parameters are moved to [..., K, pixels], pixels minor: the
  elementwise math, the sum over channels and the logsumexp over components then run
  along the long pixel axis, which XLA:CPU vectorizes far better than the same math with
  the K parameters minor.
  """
  name, m = "mixture_logistic", num_mixtures
  half_bin = 1.0 / (NUM_LEVELS - 1)  # in [-1, 1] units
  edge = 1.0 - half_bin
  half = 0.5 * (NUM_LEVELS - 1)  # level index = (value in [-1, 1] + 1) * half

  def channels_out(c):
    c = _check_channels(c)
    return 10 * m if c == 3 else m * (1 + 2 * c)

  def channels_in(k):
    if k == 10 * m:
      return 3
    c, rest = divmod(k // m - 1, 2) if k % m == 0 else (0, 1)
    if rest or c < 1 or c == 3:
      raise ValueError(
        f"{name}: {k} raw channels fit no channel count for {m} mixtures "
        f"(want 10*M for RGB, M*(1+2C) otherwise)"
      )
    return c

  def split(raw, c):
    """raw [..., K, N] (N pixels minor) -> logits [..., M, N] and means, log-scales,
    coupling coefficients [..., C, M, N] (coefficients None unless C == 3)."""
    per = 3 if c == 3 else 2
    p = raw[..., m:, :].reshape(*raw.shape[:-2], c, per * m, raw.shape[-1])
    coeffs = jnp.tanh(p[..., 2 * m :, :]) if c == 3 else None
    return (
      raw[..., :m, :],
      p[..., :m, :],
      jnp.maximum(p[..., m : 2 * m, :], LOG_SCALE_MIN),
      coeffs,
    )

  def couple(means, coeffs, r, g, clip=lambda v: v):
    """The means of R, of G given r and of B given r and g: [..., C, M, N]."""
    return jnp.stack(
      [
        means[..., 0, :, :],
        clip(means[..., 1, :, :] + coeffs[..., 0, :, :] * r),
        clip(means[..., 2, :, :] + coeffs[..., 1, :, :] * r + coeffs[..., 2, :, :] * g),
      ],
      axis=-3,
    )

  def log_prob(raw, x):
    _check_shapes(name, channels_out, raw, x)
    c, n = x.shape[-1], math.prod(x.shape[-3:-1])
    raw = jnp.swapaxes(raw.astype(jnp.float32).reshape(*raw.shape[:-3], n, raw.shape[-1]), -1, -2)
    x = jnp.swapaxes(2.0 * x.astype(jnp.float32).reshape(*x.shape[:-3], n, c) - 1.0, -1, -2)
    logits, means, log_scales, coeffs = split(raw, c)  # x: [..., batch, C, N]
    if coeffs is not None:  # G's and B's means given the data's R (and G)
      means = couple(means, coeffs, x[..., 0:1, :], x[..., 1:2, :])
    log_mass = _discretized_logistic_log_mass(
      x[..., None, :], means, log_scales, half_bin, -edge, edge, bin_mass
    )  # [..., batch, C, M, N]
    log_joint = jnp.sum(log_mass, axis=-3) + jax.nn.log_softmax(logits, axis=-2)
    return jnp.sum(jax.nn.logsumexp(log_joint, axis=-2), axis=-1)

  def mean(raw):
    c = channels_in(raw.shape[-1])
    logits, means, _, coeffs = split(raw.astype(jnp.float32)[..., None], c)
    clip = lambda v: jnp.clip(v, -1.0, 1.0)
    if coeffs is None:
      means = clip(means)
    else:  # the coupled means given the (clipped) means of R and G
      r = clip(means[..., 0, :, :])
      g = clip(means[..., 1, :, :] + coeffs[..., 0, :, :] * r)
      means = couple(means.at[..., 0, :, :].set(r), coeffs, r, g, clip)
    weights = jax.nn.softmax(logits, axis=-2)[..., None, :, :]
    return jnp.clip(0.5 * (jnp.sum(weights * means, axis=-2)[..., 0] + 1.0), 0.0, 1.0)

  def sample(key, raw, temperature=1.0):
    c = channels_in(raw.shape[-1])
    logits, means, log_scales, coeffs = split(raw.astype(jnp.float32)[..., None], c)
    key_component, key_noise = jax.random.split(key)
    logits = logits[..., 0]  # [..., M]
    component = jnp.argmax(logits + jax.random.gumbel(key_component, logits.shape), axis=-1)
    onehot = jax.nn.one_hot(component, m, dtype=jnp.float32)[..., None, :]
    pick = lambda a: jnp.sum(a[..., 0] * onehot, axis=-1)  # [..., C, M, 1] -> [..., C]
    noise = jax.random.logistic(key_noise, (*logits.shape[:-1], c), jnp.float32)
    v = pick(means) + jnp.exp(pick(log_scales)) * temperature * noise  # [-1, 1] units
    level = lambda u: _to_levels(u + 1.0, half)
    if coeffs is None:
      levels = level(v)
    else:  # G and B given the sampled, quantized R (and G): what log_prob conditions on
      a = pick(coeffs)
      r = level(v[..., 0])
      g = level(v[..., 1] + a[..., 0] * (r / half - 1.0))
      b = level(v[..., 2] + a[..., 1] * (r / half - 1.0) + a[..., 2] * (g / half - 1.0))
      levels = jnp.stack([r, g, b], axis=-1)
    return levels / (NUM_LEVELS - 1.0)

  return Likelihood(name, channels_out, log_prob, mean, sample, True, "8bit")


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------
def _number(option, value):
  if isinstance(value, (bool, str)):
    raise ValueError(f"{option} must be a finite number, got {value!r}")
  try:
    value = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{option} must be a finite number, got {value!r}") from None
  if not math.isfinite(value):
    raise ValueError(f"{option} must be a finite number, got {value!r}")
  return value


def _positive_int(option, value):
  if isinstance(value, bool) or not hasattr(value, "__index__") or value.__index__() < 1:
    raise ValueError(f"{option} must be a positive integer, got {value!r}")
  return value.__index__()  # numpy integers too


def _bin_mass(option, value):
  if value not in BIN_MASSES:
    raise ValueError(f"{option} must be one of {', '.join(BIN_MASSES)}, got {value!r}")
  return value


# name -> (factory, {option: validator})
_REGISTRY = {
  "bernoulli": (_bernoulli, {}),
  "gaussian": (_gaussian, {"gaussian_logvar": _number}),
  "laplace": (_laplace, {"laplace_log_scale": _number}),
  "discretized_logistic": (_discretized_logistic, {"bin_mass": _bin_mass}),
  "mixture_logistic": (_mixture_logistic, {"num_mixtures": _positive_int, "bin_mass": _bin_mass}),
}
LIKELIHOODS = tuple(_REGISTRY)


def get_likelihood(name, **options) -> Likelihood:
  """The output family `name` with its options; options given as None are left at their
  defaults (so a config can pass every option for every family).

    bernoulli
    gaussian              gaussian_logvar=None (learned) or a fixed log-variance
    laplace               laplace_log_scale=None (learned) or a fixed log-scale (log b)
    discretized_logistic  bin_mass="exact" | "pixelcnn"
    mixture_logistic      num_mixtures=10, bin_mass="exact" | "pixelcnn"

  Raises ValueError (one line naming the valid choices) for an unknown name, an option
  the family does not take, or a bad option value.
  """
  if name not in _REGISTRY:
    raise ValueError(f"unknown likelihood {name!r}: use one of {', '.join(LIKELIHOODS)}")
  factory, validators = _REGISTRY[name]
  options = {k: v for k, v in options.items() if v is not None}
  unknown = sorted(set(options) - set(validators))
  if unknown:
    takes = ", ".join(validators) if validators else "no options"
    raise ValueError(f"likelihood {name!r} does not take {', '.join(unknown)}: it takes {takes}")
  return factory(**{k: validators[k](k, v) for k, v in options.items()})
