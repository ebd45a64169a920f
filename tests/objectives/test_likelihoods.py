"""The output likelihoods against direct float64 computations, normalisation, stability and
sampling.

Everything runs in float32 under jit; the references are numpy float64 written from the
definitions (a bin's mass is a difference of logistic CDFs), not from the module's
identities.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxvae.objectives import likelihoods as lk

jax.config.update("jax_enable_x64", False)

LEVELS = np.arange(256)


def key(seed):
  """A PRNG key. The families use only jax.random's samplers, so any key works; "rbg" keys
  compile several times faster than threefry on XLA:CPU, which keeps these tests short."""
  return jax.random.key(seed, impl="rbg")


# ---------------------------------------------------------------------------
# float64 references
# ---------------------------------------------------------------------------
def _logsumexp(a, axis):
  top = np.max(a, axis=axis, keepdims=True)
  return np.squeeze(top, axis) + np.log(np.sum(np.exp(a - top), axis=axis))


def ref_log_mass(k, mean, scale, half_bin, unit):
  """log P(bin k) for a logistic(mean, scale): log(F(hi) - F(lo)) for bin k's edges
  lo, hi = v -/+ half_bin around its value v = unit(k), with lo = -inf for k == 0 and
  hi = +inf for k == 255. In float64 and in log space: the lower tail as CDF differences,
  the upper tail as survival-function differences, so that neither cancels. (Beyond
  log-scales of ~10 the two log-CDFs agree to float64 precision and this loses accuracy.)"""
  k = np.asarray(k)
  v = unit(k)
  lo_t, hi_t = (v - half_bin - mean) / scale, (v + half_bin - mean) / scale
  log_cdf = lambda t: -np.logaddexp(0.0, -t)
  log_sf = lambda t: -np.logaddexp(0.0, t)
  with np.errstate(divide="ignore", invalid="ignore"):
    lower = log_cdf(hi_t) + np.log(-np.expm1(log_cdf(lo_t) - log_cdf(hi_t)))
    upper = log_sf(lo_t) + np.log(-np.expm1(log_sf(hi_t) - log_sf(lo_t)))
  interior = np.where(lo_t > 0, upper, lower)
  return np.where(k == 0, log_cdf(hi_t), np.where(k == 255, log_sf(lo_t), interior))


def f32(a):
  """The float32 value the model receives, in float64."""
  return np.asarray(a, np.float32).astype(np.float64)


def unit_01(k):
  """Level k's value in [0, 1] as float32 data hold it."""
  return f32(np.asarray(k) / 255.0)


def unit_11(k):
  """Level k's value in PixelCNN++'s [-1, 1] units, from the float32 datum."""
  return 2.0 * unit_01(k) - 1.0


def ref_discretized_logistic(raw, k):
  """raw [n, 2] (mean, log-scale in [0, 1] units), k [n] levels -> [n]."""
  raw = f32(raw)
  scale = np.exp(np.maximum(raw[:, 1], -7.0))
  return ref_log_mass(k, raw[:, 0], scale, 0.5 / 255, unit_01)


def ref_mixture(raw, k, m):
  """raw [n, K] in PixelCNN++'s layout, k [n, C] levels -> [n]: log sum_m pi_m prod_c
  P_m(bin k_c | k_<c), in [-1, 1] units."""
  raw, k = f32(raw), np.asarray(k)
  n, c = k.shape
  x = unit_11(k)
  per = 3 if c == 3 else 2
  p = raw[:, m:].reshape(n, c, per * m)
  mu, scale = p[:, :, :m].copy(), np.exp(np.maximum(p[:, :, m : 2 * m], -7.0))
  if c == 3:
    a = np.tanh(p[:, :, 2 * m :])
    mu[:, 1] += a[:, 0] * x[:, 0:1]
    mu[:, 2] += a[:, 1] * x[:, 0:1] + a[:, 2] * x[:, 1:2]
  log_mass = ref_log_mass(k[:, :, None], mu, scale, 1.0 / 255, unit_11)
  log_w = raw[:, :m] - _logsumexp(raw[:, :m], -1)[:, None]
  return _logsumexp(log_w + log_mass.sum(1), -1)


def pixels(raw, k):
  """Per-pixel arrays as a batch of 1x1 images: raw [n, K] -> [n, 1, 1, K], levels [n, C]
  -> x [n, 1, 1, C] in [0, 1]."""
  k = np.asarray(k).reshape(len(raw), -1)
  return (
    jnp.asarray(raw, jnp.float32)[:, None, None, :],
    jnp.asarray(k / 255.0, jnp.float32)[:, None, None, :],
  )


def mixture_raw(rng, n, m, c, mean_range=1.2, log_scale=(-7.5, -1.0)):
  """Random PixelCNN++ parameters [n, K]: logits, then per channel means, log-scales,
  coupling coefficients."""
  per = 3 if c == 3 else 2
  logits = rng.normal(size=(n, m)) * 2
  p = np.empty((n, c, per * m))
  p[:, :, :m] = rng.uniform(-mean_range, mean_range, (n, c, m))
  p[:, :, m : 2 * m] = rng.uniform(*log_scale, (n, c, m))
  if c == 3:
    p[:, :, 2 * m :] = rng.normal(size=(n, c, m))
  return np.concatenate([logits, p.reshape(n, -1)], -1)


def random_levels(rng, shape):
  """Uniform 8-bit levels with the edge levels 0 and 255 over-represented."""
  k = rng.integers(0, 256, shape)
  edge = rng.uniform(size=shape)
  return np.where(edge < 0.15, 0, np.where(edge > 0.85, 255, k))


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------
def test_registry_families_and_options():
  assert lk.LIKELIHOODS == (
    "bernoulli",
    "gaussian",
    "laplace",
    "discretized_logistic",
    "mixture_logistic",
  )
  b, g, gf = (
    lk.get_likelihood("bernoulli"),
    lk.get_likelihood("gaussian"),
    lk.get_likelihood("gaussian", gaussian_logvar=-2),
  )
  dl, ml = (
    lk.get_likelihood("discretized_logistic"),
    lk.get_likelihood("mixture_logistic", num_mixtures=5),
  )
  assert [b.channels_out(3), g.channels_out(3), gf.channels_out(3), dl.channels_out(3)] == [
    3,
    6,
    3,
    6,
  ]
  assert [ml.channels_out(1), ml.channels_out(3), ml.channels_out(2)] == [15, 50, 25]
  assert lk.get_likelihood("mixture_logistic").channels_out(3) == 100  # 10 mixtures by default
  assert lk.get_likelihood("mixture_logistic", num_mixtures=np.int64(2)).channels_out(1) == 6
  assert [(f.name, f.discrete, f.data_kind) for f in (b, g, dl, ml)] == [
    ("bernoulli", True, "binary"),
    ("gaussian", False, "continuous"),
    ("discretized_logistic", True, "8bit"),
    ("mixture_logistic", True, "8bit"),
  ]
  # None means "default", so a config may pass every option to every family.
  assert lk.get_likelihood("bernoulli", gaussian_logvar=None, num_mixtures=None).name == "bernoulli"
  bad = [
    (("nope",), {}, "bernoulli, gaussian, laplace, discretized_logistic, mixture_logistic"),
    (("bernoulli",), {"num_mixtures": 3}, "no options"),
    (("gaussian",), {"num_mixtures": 3}, "gaussian_logvar"),
    (("gaussian",), {"gaussian_logvar": "low"}, "finite number"),
    (("gaussian",), {"gaussian_logvar": float("nan")}, "finite number"),
    (("laplace",), {"gaussian_logvar": -1.0}, "laplace_log_scale"),
    (("laplace",), {"laplace_log_scale": float("inf")}, "finite number"),
    (("mixture_logistic",), {"num_mixtures": 0}, "positive integer"),
    (("mixture_logistic",), {"num_mixtures": 2.5}, "positive integer"),
    (("mixture_logistic",), {"num_mixtures": True}, "positive integer"),
    (("discretized_logistic",), {"bin_mass": "approx"}, "exact, pixelcnn"),
  ]
  for args, kwargs, words in bad:
    with pytest.raises(ValueError, match=words) as info:
      lk.get_likelihood(*args, **kwargs)
    assert "\n" not in str(info.value)
  with pytest.raises(ValueError, match="does not fit"):
    dl.log_prob(jnp.zeros((2, 4, 4, 5)), jnp.zeros((2, 4, 4, 3)))
  with pytest.raises(ValueError, match="no channel count"):
    ml.mean(jnp.zeros((1, 2, 2, 35)))  # 7 per mixture: RGB without coupling is not a layout


# ---------------------------------------------------------------------------
# Bernoulli and Gaussian; summing over H, W, C; leading sample axes
# ---------------------------------------------------------------------------
def _per_pixel(lik, raw, x):
  """log p of each (sample, example, pixel) as its own 1x1 image, summed per example."""
  *lead, b, h, w, kk = raw.shape
  one = jax.jit(lik.log_prob)(
    raw.reshape(*lead, b * h * w, 1, 1, kk), x.reshape(b * h * w, 1, 1, x.shape[-1])
  )
  return np.asarray(one).reshape(*lead, b, h * w).sum(-1)


@pytest.mark.parametrize(
  "name,options",
  [
    ("bernoulli", {}),
    ("gaussian", {}),
    ("gaussian", {"gaussian_logvar": -1.5}),
    ("laplace", {}),
    ("laplace", {"laplace_log_scale": -2.5}),
    ("discretized_logistic", {}),
    ("mixture_logistic", {"num_mixtures": 3}),
  ],
)
def test_sums_over_pixels_and_channels_with_a_sample_axis(name, options):
  lik = lk.get_likelihood(name, **options)
  rng = np.random.default_rng(0)
  raw = jnp.asarray(rng.normal(size=(2, 3, 4, 5, lik.channels_out(3))), jnp.float32)
  x = jnp.asarray(random_levels(rng, (3, 4, 5, 3)) / 255.0, jnp.float32)
  got = jax.jit(lik.log_prob)(raw, x)
  assert got.shape == (2, 3) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, _per_pixel(lik, raw, x), rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(got[1], jax.jit(lik.log_prob)(raw[1], x), rtol=1e-6, atol=1e-4)
  # A bfloat16 decoder output is computed in float32.
  half = jax.jit(lik.log_prob)(raw.astype(jnp.bfloat16), x)
  assert half.dtype == jnp.float32
  np.testing.assert_allclose(
    half,
    jax.jit(lik.log_prob)(raw.astype(jnp.bfloat16).astype(jnp.float32), x),
    rtol=1e-6,
    atol=1e-4,
  )


def test_bernoulli_matches_direct_formula():
  lik = lk.get_likelihood("bernoulli")
  rng = np.random.default_rng(1)
  logits = np.concatenate([rng.normal(size=200) * 4, [-80.0, -30.0, 0.0, 30.0, 80.0] * 2])
  x = (rng.uniform(size=logits.shape) < 0.5).astype(np.float64)
  x[-10:] = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
  got = jax.jit(lik.log_prob)(*pixels(logits[:, None], x * 255))
  log_p, log_not_p = -np.logaddexp(0, -logits), -np.logaddexp(0, logits)  # log p, log(1 - p)
  np.testing.assert_allclose(got, x * log_p + (1 - x) * log_not_p, rtol=1e-6, atol=1e-6)


def test_gaussian_matches_density():
  rng = np.random.default_rng(2)
  mu, logvar = rng.normal(size=300), rng.uniform(-6, 3, 300)
  k = random_levels(rng, 300)
  x = k / 255.0
  # log of exp(-(x - mu)^2 / (2 var)) / sqrt(2 pi var), without underflowing the exp
  density = lambda var: -((x - mu) ** 2) / (2 * var) - np.log(np.sqrt(2 * np.pi * var))
  learned = jax.jit(lk.get_likelihood("gaussian").log_prob)(*pixels(np.stack([mu, logvar], -1), k))
  np.testing.assert_allclose(learned, density(np.exp(logvar)), rtol=1e-5, atol=1e-4)
  fixed = jax.jit(lk.get_likelihood("gaussian", gaussian_logvar=-2.0).log_prob)(
    *pixels(mu[:, None], k)
  )
  np.testing.assert_allclose(fixed, density(np.exp(-2.0)), rtol=1e-5, atol=1e-4)


def test_laplace_is_ldms_l1_nll():
  """-log p(x01) of mean (out11 + 1) / 2 and log b = logvar - log 2 is LDM's per-pixel nll
  |x11 - out11| / exp(logvar) + logvar (LPIPSWithDiscriminator, perceptual weight 0)."""
  rng = np.random.default_rng(12)
  out11, logvar = rng.uniform(-1.3, 1.3, 300), rng.uniform(-4, 3, 300)
  k = random_levels(rng, 300)
  x11 = 2 * (k / 255.0) - 1
  ldm_nll = np.abs(x11 - out11) / np.exp(logvar) + logvar
  raw = np.stack([(out11 + 1) / 2, logvar - np.log(2)], -1)
  learned = jax.jit(lk.get_likelihood("laplace").log_prob)(*pixels(raw, k))
  np.testing.assert_allclose(-np.asarray(learned), ldm_nll, rtol=1e-5, atol=1e-4)
  # LDM's default logvar 0 as the fixed log-scale: the nll is the L1 distance itself.
  fixed = jax.jit(lk.get_likelihood("laplace", laplace_log_scale=-np.log(2)).log_prob)(
    *pixels((out11[:, None] + 1) / 2, k)
  )
  np.testing.assert_allclose(-np.asarray(fixed), np.abs(x11 - out11), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# The discretized families against float64 CDF differences
# ---------------------------------------------------------------------------
def test_discretized_logistic_matches_cdf_differences():
  rng = np.random.default_rng(3)
  n = 4000
  raw = np.stack([rng.uniform(-0.3, 1.3, n), rng.uniform(-8.0, 3.0, n)], -1)
  k = random_levels(rng, n)
  got = jax.jit(lk.get_likelihood("discretized_logistic").log_prob)(*pixels(raw, k))
  want = ref_discretized_logistic(raw, k)
  assert np.all(np.isfinite(want)) and want.min() < -500  # far tails are in the test
  # float32 rounding inside: measured max error ~2e-7 |log p| + 2e-8.
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("c,m", [(1, 1), (1, 4), (3, 1), (3, 5)])
def test_mixture_logistic_matches_cdf_differences(c, m):
  rng = np.random.default_rng(4 + c * 10 + m)
  n = 3000
  raw = mixture_raw(rng, n, m, c, log_scale=(-8.0, 3.5))
  k = random_levels(rng, (n, c))
  got = jax.jit(lk.get_likelihood("mixture_logistic", num_mixtures=m).log_prob)(*pixels(raw, k))
  want = ref_mixture(raw, k, m)
  assert np.all(np.isfinite(want))
  # float32 rounding inside (2x - 1, the coupled means): measured max ~7e-6 (|log p| + 1).
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_pixelcnn_bin_mass_is_the_pixelcnn_formula():
  """bin_mass="pixelcnn" is PixelCNN++'s arithmetic: the exact mass where the CDF
  difference is not small, the density at the bin centre times the bin width in the tails."""
  rng = np.random.default_rng(5)
  n = 4000
  raw = np.stack([rng.uniform(-0.3, 1.3, n), rng.uniform(-7.0, -1.0, n)], -1)
  k = rng.integers(1, 255, n)  # interior bins
  got = np.asarray(
    jax.jit(lk.get_likelihood("discretized_logistic", bin_mass="pixelcnn").log_prob)(
      *pixels(raw, k)
    )
  )
  exact = ref_discretized_logistic(raw, k)
  big = exact > math.log(1e-3)
  np.testing.assert_allclose(got[big], exact[big], atol=1e-3)
  mid = (k / 255.0 - raw[:, 0]) / np.exp(raw[:, 1])
  log_pdf_mid = mid - raw[:, 1] - 2 * np.logaddexp(0, mid) + math.log(1 / 255)
  tiny = exact < math.log(1e-7)
  assert tiny.sum() > 100
  np.testing.assert_allclose(got[tiny], log_pdf_mid[tiny], rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------
# Normalisation: the mass over the 256 levels (or 256^3 colours) is 1
# ---------------------------------------------------------------------------
def _total_mass_1d(lik, raw):
  """raw [n, K] for n one-channel pixels -> [n]: sum over all 256 levels of exp(log p)."""
  n = len(raw)
  raw = jnp.broadcast_to(
    jnp.asarray(raw, jnp.float32)[:, None, None, None, :], (n, 256, 1, 1, raw.shape[-1])
  )
  x = jnp.asarray(LEVELS / 255.0, jnp.float32).reshape(256, 1, 1, 1)
  return jnp.exp(jax.nn.logsumexp(jax.jit(lik.log_prob)(raw, x), axis=-1))


EXTREME_MEANS = [-1e4, -30.0, -1.0, -0.002, 0.0, 0.37, 0.5, 1.0, 1.002, 2.0, 30.0, 1e4]
EXTREME_LOG_SCALES = [-20.0, -7.0, -6.0, -4.0, -1.0, 0.0, 2.0, 3.0, 8.0, 20.0]


@pytest.mark.parametrize("bin_mass", lk.BIN_MASSES)
def test_discretized_logistic_sums_to_one(bin_mass):
  raw = np.array([[m, s] for m in EXTREME_MEANS for s in EXTREME_LOG_SCALES])
  total = _total_mass_1d(lk.get_likelihood("discretized_logistic", bin_mass=bin_mass), raw)
  np.testing.assert_allclose(total, 1.0, atol=1e-4 if bin_mass == "exact" else 2e-4)


def test_mixture_logistic_one_channel_sums_to_one():
  rng = np.random.default_rng(6)
  raw = mixture_raw(rng, 300, 3, 1, mean_range=1.5, log_scale=(-9.0, 2.0))
  raw[:30, :3] = [1e4, -1e4, 0.0]  # huge logits
  total = _total_mass_1d(lk.get_likelihood("mixture_logistic", num_mixtures=3), raw)
  np.testing.assert_allclose(total, 1.0, atol=1e-4)


def _component_log_q(k, mean, log_scale):
  """log q(k; mean, scale): the one-channel, one-component mixture_logistic (the 1-D
  discretized logistic in [-1, 1] units), evaluated through the public API."""
  one = lk.get_likelihood("mixture_logistic", num_mixtures=1)
  k, mean, log_scale = jnp.broadcast_arrays(jnp.asarray(k, jnp.float32), mean, log_scale)
  raw = jnp.stack([jnp.zeros_like(mean), mean, log_scale], -1).reshape(-1, 1, 1, 3)
  return one.log_prob(raw, (k / 255.0).reshape(-1, 1, 1, 1)).reshape(k.shape)


def test_mixture_logistic_rgb_sums_to_one():
  """The RGB mixture sums to 1 over all 256^3 colours, shown in two ways.

  1. Factorisation (rigorous for every parameter value, checked numerically here):
     (a) log p(R, G, B) equals log sum_m pi_m q(R; mu_R) q(G; mu_G + a R') q(B; mu_B + b R' + c G')
         (R' etc. in [-1, 1] units), where q(.; mean, scale) is the one-channel,
         one-component family, on random colours including the edges 0 and 255;
     (b) q(.; mean, scale) sums to 1 over its 256 levels for *every* mean (its bins tile
         the line, the edge bins taking the tails, so the CDF differences telescope to
         F(inf) - F(-inf) = 1), checked on a dense grid of means covering every coupled
         mean the draws can reach (|mu| + |a| + |b|... <= 4) and of scales;
     then, summing B, then G, then R:
       sum_{R,G,B} p = sum_m pi_m sum_R q(R) sum_G q(G | R) sum_B q(B | R, G)
                     = sum_m pi_m * 1 = 1,
     because q(G | R) and q(B | R, G) are q at some mean that depends on R (and G), and (b)
     holds at every such mean. (c) Also the brief's direct check: for fixed (R, G) the sum
     over B's 256 levels of p(R, G, B) equals p(R, G) = sum_m pi_m q(R) q(G | R).
  2. Brute force: the sum of exp(log p) over all 256^3 colours of one pixel (two
     components, one broad, one sharp with strong coupling), ~0.7 s.
  """
  m = 3
  lik = lk.get_likelihood("mixture_logistic", num_mixtures=m)
  rng = np.random.default_rng(7)
  n = 400
  raw = mixture_raw(rng, n, m, 3, log_scale=(-8.0, 0.0))
  k = random_levels(rng, (n, 3))
  got = jax.jit(lik.log_prob)(*pixels(raw, k))

  # (a) the chain-rule form through the one-channel family.
  chain, marginal = _chain_rule_form(jnp.asarray(raw, jnp.float32), jnp.asarray(k), m)
  np.testing.assert_allclose(got, chain, rtol=1e-5, atol=1e-4)  # float32, other rounding order

  # (b) q sums to 1 at every mean the coupling can produce (|mean| <= 1.2 + 1 + 1) and scale.
  total = jax.jit(
    lambda levels, means, log_scales: jnp.sum(
      jnp.exp(_component_log_q(levels, means, log_scales)), 0
    )
  )(
    jnp.asarray(LEVELS)[:, None, None],
    jnp.linspace(-4.0, 4.0, 801)[:, None],
    jnp.array([-20.0, -7.0, -5.5, -3.0, 0.0, 3.0]),
  )
  np.testing.assert_allclose(total, 1.0, atol=1e-4)

  # (c) summing B out for fixed (R, G) leaves the marginal form p(R, G).
  sel = np.arange(40)
  raw_b = jnp.broadcast_to(
    jnp.asarray(raw[sel], jnp.float32)[:, None, None, None, :], (len(sel), 256, 1, 1, raw.shape[-1])
  )
  x_b = np.broadcast_to(k[sel][:, None, :], (len(sel), 256, 3)).copy()
  x_b[..., 2] = LEVELS
  joint = jax.jit(lik.log_prob)(
    raw_b, jnp.asarray(x_b / 255.0, jnp.float32).reshape(len(sel), 256, 1, 1, 3)
  )
  np.testing.assert_allclose(jax.nn.logsumexp(joint, -1), marginal[sel], rtol=1e-5, atol=1e-4)

  # 2. brute force over the 256^3 colours, for one pixel of two components: a broad one
  # and a sharp one with strong coupling (tanh(3) on all of a, b, c: B's mean up to +-3).
  one = mixture_raw(np.random.default_rng(8), 1, 2, 3, log_scale=(-7.0, 0.0))[0]
  per_channel = one[2:].reshape(3, 3, 2)  # [channel, (means, log-scales, coefficients), m]
  per_channel[:, 1, 1] = [-7.0, -6.0, -5.0]
  per_channel[:, 2, 1] = 3.0
  one[2:] = per_channel.reshape(-1)
  total = _brute_force_rgb_mass(
    lk.get_likelihood("mixture_logistic", num_mixtures=2), jnp.asarray(one, jnp.float32)
  )
  np.testing.assert_allclose(total, 1.0, atol=1e-4)


@jax.jit(static_argnums=2)
def _chain_rule_form(raw, k, m):
  """For RGB pixels raw [n, 10 m] and levels k [n, 3]: log sum_m pi_m q(R) q(G | R) q(B | R, G)
  and the marginal form log p(R, G) = log sum_m pi_m q(R) q(G | R), with q the one-channel,
  one-component family at the coupled means."""
  p = raw[:, m:].reshape(len(raw), 3, 3 * m)
  mu, log_scale, coef = p[..., :m], p[..., m : 2 * m], jnp.tanh(p[..., 2 * m :])
  value = (2.0 * (k / 255.0) - 1.0)[..., None]  # [n, 3, 1], in [-1, 1] units
  kk = k[..., None]
  log_q_r = _component_log_q(kk[:, 0], mu[:, 0], log_scale[:, 0])
  log_q_g = _component_log_q(kk[:, 1], mu[:, 1] + coef[:, 0] * value[:, 0], log_scale[:, 1])
  log_q_b = _component_log_q(
    kk[:, 2], mu[:, 2] + coef[:, 1] * value[:, 0] + coef[:, 2] * value[:, 1], log_scale[:, 2]
  )
  log_w = jax.nn.log_softmax(raw[:, :m], -1)
  return (
    jax.nn.logsumexp(log_w + log_q_r + log_q_g + log_q_b, -1),
    jax.nn.logsumexp(log_w + log_q_r + log_q_g, -1),
  )


@jax.jit(static_argnums=0)
def _brute_force_rgb_mass(lik, raw):
  """sum over all 256^3 colours of exp(log p) for one pixel's raw [K], 256 slices of R."""
  levels = jnp.arange(256, dtype=jnp.float32) / 255.0
  gb = jnp.stack(jnp.meshgrid(levels, levels, indexing="ij"), -1).reshape(-1, 2)
  raw = jnp.broadcast_to(raw, (256 * 256, 1, 1, raw.shape[-1]))

  def slice_mass(r):
    x = jnp.concatenate([jnp.full((256 * 256, 1), r), gb], -1).reshape(-1, 1, 1, 3)
    return jnp.sum(jnp.exp(lik.log_prob(raw, x)))

  return jnp.sum(jax.lax.map(slice_mass, levels))


# ---------------------------------------------------------------------------
# Stability: finite values and gradients at extreme parameters
# ---------------------------------------------------------------------------
def _finite_with_gradients(lik, raw, k):
  raw, x = pixels(raw, k)
  value, grad = jax.jit(jax.value_and_grad(lambda r: jnp.sum(lik.log_prob(r, x))))(raw)
  per_pixel = jax.jit(lik.log_prob)(raw, x)
  assert np.all(np.isfinite(per_pixel)), np.asarray(raw)[~np.isfinite(per_pixel)][:5]
  assert np.isfinite(value) and np.all(np.isfinite(grad))
  return np.asarray(per_pixel)


@pytest.mark.parametrize("bin_mass", lk.BIN_MASSES)
def test_discretized_logistic_is_stable_at_extremes(bin_mass):
  lik = lk.get_likelihood("discretized_logistic", bin_mass=bin_mass)
  grid = np.array(
    [
      (mu, s, k)
      for mu in EXTREME_MEANS
      for s in EXTREME_LOG_SCALES + [50.0]
      for k in (0, 1, 128, 254, 255)
    ]
  )
  log_p = _finite_with_gradients(lik, grid[:, :2], grid[:, 2])
  if bin_mass == "exact":
    assert np.all(log_p <= 1e-6)
    want = ref_discretized_logistic(grid[:, :2], grid[:, 2].astype(int))
    ok = grid[:, 1] <= 8.0  # where the float64 reference is itself accurate (see ref_log_mass)
    np.testing.assert_allclose(log_p[ok], want[ok], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bin_mass", lk.BIN_MASSES)
@pytest.mark.parametrize("c", [1, 3])
def test_mixture_logistic_is_stable_at_extremes(bin_mass, c):
  m = 2
  lik = lk.get_likelihood("mixture_logistic", num_mixtures=m, bin_mass=bin_mass)
  rng = np.random.default_rng(9)
  n = 2000
  per = 3 if c == 3 else 2
  logits = rng.choice([-1e4, -30.0, 0.0, 30.0, 1e4], (n, m))
  p = np.empty((n, c, per * m))
  p[:, :, :m] = rng.choice([-1e4, -30.0, -1.0, 0.0, 0.5, 1.0, 30.0, 1e4], (n, c, m))
  p[:, :, m : 2 * m] = rng.choice([-20.0, -7.0, -3.0, 0.0, 3.0, 8.0, 20.0, 50.0], (n, c, m))
  if c == 3:
    p[:, :, 2 * m :] = rng.choice([-1e4, -1.0, 0.0, 1.0, 1e4], (n, c, m))
  raw = np.concatenate([logits, p.reshape(n, -1)], -1)
  k = rng.choice([0, 1, 128, 254, 255], (n, c))
  log_p = _finite_with_gradients(lik, raw, k)
  if bin_mass == "exact":
    assert np.all(log_p <= 1e-5)
    with np.errstate(invalid="ignore"):
      want = ref_mixture(raw, k, m)
    ok = np.all(p[:, :, m : 2 * m] <= 8.0, axis=(1, 2))  # where the float64 reference is accurate
    assert ok.sum() > 100
    np.testing.assert_allclose(log_p[ok], want[ok], rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------
# sample() and mean()
# ---------------------------------------------------------------------------
def _assert_on_grid(values):
  levels = np.asarray(values, np.float64) * 255.0
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
  assert levels.min() >= 0 and levels.max() <= 255


@pytest.mark.parametrize(
  "name,options",
  [
    ("bernoulli", {}),
    ("gaussian", {}),
    ("gaussian", {"gaussian_logvar": -3.0}),
    ("laplace", {}),
    ("laplace", {"laplace_log_scale": -3.0}),
    ("discretized_logistic", {}),
    ("mixture_logistic", {"num_mixtures": 3}),
  ],
)
def test_sample_and_mean_shapes_and_value_sets(name, options):
  lik = lk.get_likelihood(name, **options)
  rng = np.random.default_rng(10)
  raws = {
    c: jnp.asarray(rng.normal(size=(2, 3, 4, 5, lik.channels_out(c))) * 2, jnp.float32)
    for c in (1, 3)
  }

  @jax.jit
  def run(raws, key):
    out = {}
    for c, raw in raws.items():
      sample, mean = lik.sample(key, raw), lik.mean(raw)
      out[c] = sample, mean, lik.log_prob(raw, sample[0])  # samples are valid data
    return out

  for c, (sample, mean, log_p) in run(raws, key(11)).items():
    assert sample.shape == mean.shape == (2, 3, 4, 5, c)
    assert sample.dtype == mean.dtype == jnp.float32
    if lik.data_kind == "binary":
      assert set(np.unique(sample)) <= {0.0, 1.0}
    elif lik.data_kind == "8bit":
      _assert_on_grid(sample)
    else:
      assert 0.0 <= float(sample.min()) and float(sample.max()) <= 1.0
    if name not in ("gaussian", "laplace"):  # their means are unclipped
      assert 0.0 <= float(mean.min()) and float(mean.max()) <= 1.0
    assert np.all(np.isfinite(log_p))


def test_sharp_samples_are_the_mode():
  rng = np.random.default_rng(12)
  logits = rng.normal(size=(50, 1, 1, 3)) * 5
  mode = (logits > 0).astype(np.float32)
  bern = lk.get_likelihood("bernoulli")
  np.testing.assert_array_equal(bern.sample(key(0), jnp.asarray(logits), 0.0), mode)
  np.testing.assert_array_equal(bern.sample(key(0), jnp.asarray(np.sign(logits) * 60.0)), mode)

  dl = lk.get_likelihood("discretized_logistic")
  # means inside a bin (not within 0.1 bin of its edge) or outside [0, 1]
  mean = (rng.integers(-30, 286, (50, 1, 1, 3)) + rng.uniform(-0.4, 0.4, (50, 1, 1, 3))) / 255
  raw = jnp.asarray(
    np.stack([mean, np.full_like(mean, -7.0)], -1).reshape(50, 1, 1, 6), jnp.float32
  )
  mode = np.clip(np.round(mean * 255), 0, 255) / 255
  for t in (0.0, 0.02):
    np.testing.assert_allclose(jax.jit(dl.sample)(key(1), raw, t), mode, atol=1e-7)
  np.testing.assert_allclose(dl.mean(raw), np.clip(mean, 0, 1), atol=1e-6)

  # Mixture: one component dominates. Its mode is R's level, then G's given that level of
  # R, then B's: the winner's means are set so that each coupled mean lies inside the bin
  # of a chosen level (not within 0.1 bin of its edges) or beyond the edge bins.
  m, n = 3, 200
  quantize = lambda v: np.clip(np.round((v + 1) * 127.5), 0, 255)
  for c in (1, 3):
    ml = lk.get_likelihood("mixture_logistic", num_mixtures=m)
    raw = mixture_raw(rng, n, m, c, mean_range=1.3, log_scale=(-9.0, -7.0))
    winner = rng.integers(0, m, n)
    raw[:, :m] = np.where(np.arange(m) == winner[:, None], 40.0, -40.0)
    per = 3 if c == 3 else 2
    p = raw[:, m:].reshape(n, c, per * m)
    rows, chans = np.arange(n)[:, None], np.arange(c)[None, :]
    coef = np.tanh(p[rows, chans, 2 * m + winner[:, None]]) if c == 3 else None
    want = rng.integers(-20, 276, (n, c)) + rng.uniform(-0.4, 0.4, (n, c))  # in levels
    target = want / 127.5 - 1  # the coupled means, in [-1, 1] units
    want = quantize(target)
    mu = target.copy()
    if c == 3:  # subtract the coupling to the levels (the mode) of R and G
      r, g = want[:, 0] / 127.5 - 1, want[:, 1] / 127.5 - 1
      mu[:, 1] -= coef[:, 0] * r
      mu[:, 2] -= coef[:, 1] * r + coef[:, 2] * g
    p[rows, chans, winner[:, None]] = mu
    raw[:, m:] = p.reshape(n, -1)
    raw_j = jnp.asarray(raw, jnp.float32)[:, None, None, :]
    for t in (0.0, 0.05):
      got = jax.jit(ml.sample)(key(2), raw_j, t)
      np.testing.assert_allclose(np.asarray(got)[:, 0, 0] * 255, want, atol=1e-3)
    # mean(): the winner's coupled means, each clipped to [-1, 1], in [0, 1].
    mean_want = np.clip(mu, -1, 1)
    if c == 3:  # E[G] ~ mu_G + a E[R], ...
      mean_want[:, 1] = np.clip(mu[:, 1] + coef[:, 0] * mean_want[:, 0], -1, 1)
      mean_want[:, 2] = np.clip(
        mu[:, 2] + coef[:, 1] * mean_want[:, 0] + coef[:, 2] * mean_want[:, 1], -1, 1
      )
    np.testing.assert_allclose(ml.mean(raw_j)[:, 0, 0], (mean_want + 1) / 2, atol=1e-5)


def _pit(log_pmf, k, u):
  """Randomized probability integral transform: F(k - 1) + u P(k) per row. If k is drawn
  from the pmf, the result is Uniform(0, 1)."""
  log_pmf = np.broadcast_to(log_pmf, (len(k), 256))  # one pmf for all, or one per row
  pmf = np.exp(log_pmf - _logsumexp(log_pmf, -1)[..., None])
  cdf_before = np.cumsum(pmf, -1) - pmf
  rows = np.arange(len(k))
  return cdf_before[rows, k] + u * pmf[rows, k]


def _assert_uniform(v):
  """Kolmogorov-Smirnov distance to Uniform(0, 1) below ~the 0.1% critical value."""
  v = np.sort(v)
  n = len(v)
  d = max(np.max(np.arange(1, n + 1) / n - v), np.max(v - np.arange(n) / n))
  assert d < 1.95 / math.sqrt(n), d


def test_samples_follow_the_pmf():
  """Samples at temperature 1 are exact draws: per channel, the randomized PIT of the
  sampled level under the float64 conditional pmf given the channels before it is
  Uniform(0, 1). For RGB this checks the coupling: G's pmf is conditioned on the sampled R,
  B's on R and G (through the posterior over components given them)."""
  rng = np.random.default_rng(13)
  n = 10_000
  u = rng.uniform(size=(3, n))
  image = lambda raw: jnp.broadcast_to(jnp.asarray(raw, jnp.float32), (1, 100, 100, len(raw)))
  levels_of = lambda got, c: np.round(np.asarray(got).reshape(n, c) * 255).astype(int)

  dl = lk.get_likelihood("discretized_logistic")
  raw = np.array([0.3, math.log(0.02)])
  k = levels_of(dl.sample(key(3), image(raw)), 1)[:, 0]
  _assert_uniform(_pit(ref_discretized_logistic(np.broadcast_to(raw, (256, 2)), LEVELS), k, u[0]))

  m = 3
  ml = lk.get_likelihood("mixture_logistic", num_mixtures=m)
  raw = mixture_raw(rng, 1, m, 1, mean_range=0.8, log_scale=(-3.5, -2.0))[0]
  k = levels_of(ml.sample(key(4), image(raw)), 1)[:, 0]
  _assert_uniform(
    _pit(ref_mixture(np.broadcast_to(raw, (256, len(raw))), LEVELS[:, None], m), k, u[0])
  )

  raw = mixture_raw(rng, 1, m, 3, mean_range=0.8, log_scale=(-3.5, -2.0))[0]
  raw[m + 2 * m : m + 3 * m] = [2.0, -1.0, 0.5]  # strong coupling of G on R
  k = levels_of(ml.sample(key(5), image(raw)), 3)
  p = f32(raw)[m:].reshape(3, 3 * m)
  mu, scale, a = p[:, :m], np.exp(np.maximum(p[:, m : 2 * m], -7.0)), np.tanh(p[:, 2 * m :])
  log_q = lambda levels, mean, s: ref_log_mass(levels, mean, s, 1.0 / 255, unit_11)
  log_w = f32(raw)[:m] - _logsumexp(f32(raw)[:m], -1)
  value = unit_11(LEVELS)
  log_q_r = log_q(LEVELS[:, None], mu[0], scale[0])  # [R, m]
  log_q_g = log_q(LEVELS[None, :, None], mu[1] + a[0] * value[:, None, None], scale[1])  # [R, G, m]
  r, g = k[:, 0], k[:, 1]
  mean_b = mu[2] + a[1] * value[r][:, None] + a[2] * value[g][:, None]  # [n, m]
  log_q_b = log_q(LEVELS[None, :, None], mean_b[:, None, :], scale[2])  # [n, B, m]
  _assert_uniform(_pit(_logsumexp(log_w + log_q_r, -1), r, u[0]))
  _assert_uniform(_pit(_logsumexp(log_w + log_q_r[:, None] + log_q_g, -1)[r], g, u[1]))
  prefix = log_w + log_q_r[r] + log_q_g[r, g]  # [n, m]
  _assert_uniform(_pit(_logsumexp(prefix[:, None, :] + log_q_b, -1), k[:, 2], u[2]))
