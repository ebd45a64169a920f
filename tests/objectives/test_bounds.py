"""The ELBO's pieces (objectives/bounds.py, objectives/gaussian.py) against closed forms,
Monte Carlo and direct computation.

Terms come from a tiny one-latent model on the contract (models/gaussian_latent.py) with
noise we choose, or are written by hand where a test needs exact per-unit KLs or two layers.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxvae.models import contract
from flaxvae.models.gaussian_latent import GaussianLatentVAE
from flaxvae.objectives import bounds, gaussian
from flaxvae.objectives.likelihoods import get_likelihood

jax.config.update("jax_enable_x64", False)


# ---------------------------------------------------------------------------
# Gaussian KLs
# ---------------------------------------------------------------------------
def test_gaussian_kl_matches_monte_carlo():
  key = jax.random.key(0)
  mean = jnp.array([[0.5, -1.0, 2.0]])
  logvar = jnp.array([[-0.5, 0.3, 1.0]])
  z = gaussian.reparameterize(key, mean, logvar, num_samples=400_000)
  assert z.shape == (400_000, 1, 3)
  mc = jnp.mean(gaussian.log_normal(z, mean, logvar) - gaussian.log_standard_normal(z), axis=0)
  np.testing.assert_allclose(mc, gaussian.kl_to_standard(mean, logvar), rtol=0.02)


def test_gaussian_kl_to_a_general_prior_matches_monte_carlo_per_unit():
  key = jax.random.key(1)
  mean, logvar = jnp.array([0.5, -1.0, 2.0]), jnp.array([-0.5, 0.3, 1.0])
  prior_mean, prior_logvar = jnp.array([0.1, 0.4, 1.0]), jnp.array([0.2, -0.7, 0.5])
  z = gaussian.reparameterize(key, mean, logvar, num_samples=400_000)
  mc = jnp.mean(
    gaussian.log_normal_per_unit(z, mean, logvar)
    - gaussian.log_normal_per_unit(z, prior_mean, prior_logvar),
    axis=0,
  )
  analytic = gaussian.kl_per_unit(mean, logvar, prior_mean, prior_logvar)
  np.testing.assert_allclose(mc, analytic, rtol=0.03, atol=2e-3)
  # The N(0, 1) prior given explicitly is the default prior.
  np.testing.assert_allclose(
    gaussian.kl_per_unit(mean, logvar, 0.0, 0.0), gaussian.kl_per_unit(mean, logvar), rtol=1e-6
  )


def test_gaussian_kl_is_zero_at_the_prior():
  np.testing.assert_allclose(
    gaussian.kl_to_standard(jnp.zeros((2, 5)), jnp.zeros((2, 5))), 0.0, atol=1e-7
  )
  m, lv = jnp.array([0.3, -2.0]), jnp.array([1.5, -0.4])
  np.testing.assert_allclose(gaussian.kl_per_unit(m, lv, m, lv), 0.0, atol=1e-6)


def test_log_normal_matches_the_density():
  z, mean, logvar = 0.7, -0.2, math.log(0.3)
  want = -0.5 * math.log(2 * math.pi * 0.3) - (z - mean) ** 2 / (2 * 0.3)
  np.testing.assert_allclose(gaussian.log_normal(jnp.array([z]), mean, logvar), want, rtol=1e-6)
  np.testing.assert_allclose(
    gaussian.log_standard_normal(jnp.array([z, 0.0])), -math.log(2 * math.pi) - z**2 / 2, rtol=1e-6
  )


# ---------------------------------------------------------------------------
# A tiny model on the contract, with noise we choose
# ---------------------------------------------------------------------------
class TinyVAE(GaussianLatentVAE):
  """Linear encoder (mean and logvar) and linear decoder: logits of a Bernoulli likelihood."""

  def __init__(self, image_shape=(2, 5, 1), latent_dim=3, seed=0):
    rngs = nnx.Rngs(seed)
    self.image_shape, self.latent_dim = image_shape, latent_dim
    self.likelihood = get_likelihood("bernoulli")
    dims = math.prod(image_shape)
    self.to_mean = nnx.Linear(dims, latent_dim, rngs=rngs)
    self.to_logvar = nnx.Linear(dims, latent_dim, rngs=rngs)
    self.dec = nnx.Linear(latent_dim, dims, rngs=rngs)

  def encode(self, x):
    h = x.reshape(x.shape[0], -1)
    return self.to_mean(h), 0.3 * self.to_logvar(h)

  def decode(self, z):
    return self.dec(z).reshape(z.shape[0], *self.image_shape[:2], 1)


class GivenNoise:
  """The contract's Noise with the draws given: eps [k, b, latent] for layer 0."""

  def __init__(self, eps):
    self.eps, self.num_samples = eps, eps.shape[0]

  def normal(self, layer, shape):
    assert layer == 0 and self.eps.shape[2:] == tuple(shape)
    return self.eps


def binary_images(key, b, shape=(2, 5, 1)):
  return (jax.random.uniform(key, (b, *shape)) > 0.5).astype(jnp.float32)


def test_per_example_is_consistent_with_the_model_terms():
  model = TinyVAE()
  x = binary_images(jax.random.key(1), 6)
  eps = jax.random.normal(jax.random.key(2), (4, 6, 3))
  terms = model.terms(x, GivenNoise(eps))
  assert terms.log_px_z.shape == (4, 6) and len(terms.layers) == 1
  out = bounds.per_example(terms, kl_scale=0.5)
  assert set(out) == {"loss", "elbo", "rate", "distortion", "iwae", "rate_by_layer"}
  mean, logvar = model.encode(x)
  np.testing.assert_allclose(out["rate"], gaussian.kl_to_standard(mean, logvar), rtol=1e-5)
  np.testing.assert_allclose(out["rate_by_layer"][:, 0], out["rate"], rtol=1e-6)
  np.testing.assert_allclose(out["distortion"], -jnp.mean(terms.log_px_z, 0), rtol=1e-6)
  np.testing.assert_allclose(out["elbo"], -out["distortion"] - out["rate"], rtol=1e-6)
  np.testing.assert_allclose(out["loss"], out["distortion"] + 0.5 * out["rate"], rtol=1e-6)
  # log p(x|z) of the sampled z, by hand.
  z = mean + jnp.exp(0.5 * logvar) * eps
  logits = model.decode(z.reshape(-1, 3)).reshape(4, 6, -1)
  flat = x.reshape(6, -1)
  direct = jnp.sum(flat * logits - jax.nn.softplus(logits), -1)
  np.testing.assert_allclose(terms.log_px_z, direct, rtol=1e-5)
  with pytest.raises(ValueError, match="unknown objective"):
    bounds.per_example(terms, objective="vimco")


def test_iwae_with_one_sample_equals_elbo():
  model = TinyVAE()
  x = binary_images(jax.random.key(1), 6)
  mean, logvar = model.encode(x)
  eps = jax.random.normal(jax.random.key(4), (1, 6, 3))
  out = bounds.per_example(model.terms(x, GivenNoise(eps)), objective="iwae")
  np.testing.assert_allclose(out["loss"], -out["iwae"], rtol=1e-6)
  # One sample: IWAE_1 = log p(x|z) + log p(z) - log q(z|x), the ELBO with the single-sample
  # (Monte Carlo) KL in place of the analytic one.
  z = mean + jnp.exp(0.5 * logvar) * eps[0]
  mc_kl = gaussian.log_normal(z, mean, logvar) - gaussian.log_standard_normal(z)
  np.testing.assert_allclose(out["iwae"], -out["distortion"] - mc_kl, rtol=1e-5)
  # In expectation over the noise, the one-sample log weight is the analytic-KL ELBO.
  eps = jax.random.normal(jax.random.key(5), (5_000, 6, 3))

  @jax.jit
  def both(eps):
    terms = model.terms(x, GivenNoise(eps))
    return jnp.mean(bounds.log_weights(terms), 0), bounds.per_example(terms)["elbo"]

  mean_log_w, elbo = both(eps)
  np.testing.assert_allclose(mean_log_w, elbo, rtol=1e-2)


def test_iwae_bound_grows_with_samples():
  model = TinyVAE(latent_dim=2, seed=7)
  repeats = 100  # independent estimates per example, folded into the batch axis
  x = jnp.tile(binary_images(jax.random.key(7), 4), (repeats, 1, 1, 1))
  iwae = jax.jit(lambda eps: bounds.per_example(model.terms(x, GivenNoise(eps)))["iwae"])
  means = [
    float(jnp.mean(iwae(jax.random.normal(jax.random.key(k), (k, 4 * repeats, 2)))))
    for k in (1, 10, 100)
  ]
  assert means[0] < means[1] < means[2], means


def test_log_weights_and_rate_sum_over_layers():
  """Two hand-written layers: log w adds every layer's log p - log q, the rate every layer's KL."""
  rng = np.random.default_rng(0)
  k, b = 3, 4
  arr = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  top = contract.LatentLayer(
    z=arr(k, b, 2), log_q=arr(k, b), log_p=arr(k, b), kl=arr(k, b, 2), q_mean=arr(k, b, 2)
  )
  bottom = contract.LatentLayer(
    z=arr(k, b, 5), log_q=arr(k, b), log_p=arr(k, b), kl=arr(k, b, 5), q_mean=arr(k, b, 5)
  )
  terms = contract.Terms(log_px_z=arr(k, b), layers=(top, bottom))
  log_w = terms.log_px_z + top.log_p - top.log_q + bottom.log_p - bottom.log_q
  np.testing.assert_allclose(bounds.log_weights(terms), log_w, rtol=1e-6)
  out = bounds.per_example(terms)
  by_layer = np.stack([top.kl.sum(-1).mean(0), bottom.kl.sum(-1).mean(0)], -1)
  np.testing.assert_allclose(out["rate_by_layer"], by_layer, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["rate"], by_layer.sum(-1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    out["iwae"], np.log(np.mean(np.exp(np.asarray(log_w, np.float64)), 0)), rtol=1e-5
  )


# ---------------------------------------------------------------------------
# beta, KL warm-up, free bits
# ---------------------------------------------------------------------------
def gaussian_terms(mean, logvar):
  """One-sample Terms of one Gaussian layer with analytic per-unit KLs; log p(x|z) = 0."""
  kl = gaussian.kl_per_unit(mean, logvar)[None]
  zeros = jnp.zeros(kl.shape[:2])
  layer = contract.LatentLayer(z=mean[None], log_q=zeros, log_p=zeros, kl=kl, q_mean=mean[None])
  return contract.Terms(log_px_z=zeros, layers=(layer,))


def test_beta_and_warmup():
  assert float(bounds.kl_weight(jnp.array(50), beta=2.0, warmup_steps=100)) == pytest.approx(1.0)
  assert float(bounds.kl_weight(jnp.array(500), beta=2.0, warmup_steps=100)) == pytest.approx(2.0)
  assert float(bounds.kl_weight(jnp.array(0), beta=2.0, warmup_steps=100)) == 0.0
  assert float(bounds.kl_weight(jnp.array(3), beta=0.5)) == pytest.approx(0.5)


def test_free_bits_per_unit():
  mean = jnp.array([[0.01, 2.0], [0.0, 2.0]])
  logvar = jnp.zeros((2, 2))
  penalty = bounds.free_bits_penalty(gaussian_terms(mean, logvar), 0.5, "unit")
  # Unit 0 is nearly unused (batch-mean KL ~ 0 < 0.5): it costs the floor; unit 1 its own KL (2).
  np.testing.assert_allclose(penalty, [[2.5, 2.5]], rtol=1e-4)
  grads = jax.grad(
    lambda m: bounds.free_bits_penalty(gaussian_terms(m, logvar), 0.5, "unit").sum()
  )(mean)
  np.testing.assert_allclose(grads[:, 0], 0.0)
  np.testing.assert_allclose(grads[:, 1], mean[:, 1], rtol=1e-6)  # d/dm of m^2 / 2
  # The loss takes the penalty in place of the rate, scaled by beta; elbo and rate stay true.
  out = bounds.per_example(gaussian_terms(mean, logvar), kl_scale=2.0, free_bits=0.5)
  np.testing.assert_allclose(out["loss"], [5.0, 5.0], rtol=1e-4)
  np.testing.assert_allclose(out["rate"], gaussian.kl_to_standard(mean, logvar), rtol=1e-6)
  np.testing.assert_allclose(out["elbo"], -out["rate"], rtol=1e-6)


def test_free_bits_per_layer():
  mean, logvar = jnp.array([[0.01, 2.0], [0.0, 2.0]]), jnp.zeros((2, 2))
  kl = gaussian.kl_to_standard(mean, logvar)
  # The layer's batch-mean KL (~2) is above 0.5: no floor, the KL itself.
  np.testing.assert_allclose(
    bounds.free_bits_penalty(gaussian_terms(mean, logvar), 0.5, "layer")[0], kl, rtol=1e-6
  )
  # Below a floor of 3 nats: the constant 3, without gradient.
  np.testing.assert_allclose(
    bounds.free_bits_penalty(gaussian_terms(mean, logvar), 3.0, "layer")[0], [3.0, 3.0]
  )
  grads = jax.grad(
    lambda m: bounds.free_bits_penalty(gaussian_terms(m, logvar), 3.0, "layer").sum()
  )(mean)
  np.testing.assert_allclose(grads, 0.0)


def test_free_bits_group_mean_is_over_the_global_batch():
  """With an axis name the unit means are over all devices' examples: the same penalty as on
  the whole batch at once, whatever the split."""
  mean = jnp.array([[0.0, 2.0], [1.6, 2.0], [0.0, 0.1], [0.0, 0.1]])
  logvar = jnp.zeros_like(mean)
  whole = bounds.free_bits_penalty(gaussian_terms(mean, logvar), 0.5, "unit")
  # Alone, device 0 (unit 0 mean KL 0.64 > 0.5) and device 1 (0 < 0.5) would differ from
  # the whole batch (unit 0 mean 0.32 < 0.5: the floor everywhere).
  split = jax.vmap(
    lambda m, lv: bounds.free_bits_penalty(gaussian_terms(m, lv), 0.5, "unit", axis_name="d"),
    axis_name="d",
  )(mean.reshape(2, 2, 2), logvar.reshape(2, 2, 2))
  np.testing.assert_allclose(split.transpose(1, 0, 2).reshape(1, 4), whole, rtol=1e-6)
  alone = bounds.free_bits_penalty(gaussian_terms(mean[:2], logvar[:2]), 0.5, "unit")
  assert not np.allclose(alone, whole[:, :2])


# ---------------------------------------------------------------------------
# Units
# ---------------------------------------------------------------------------
def test_bits_per_dim():
  assert bounds.bits_per_dim(784 * math.log(2.0), 784) == pytest.approx(1.0)
  assert bounds.bits_per_dim(0.0, 10) == 0.0


def test_log_mean_exp_is_exact_and_stable():
  v = jnp.array([[0.1, -2.0], [1.5, 0.3], [-0.7, 0.0]])
  np.testing.assert_allclose(bounds.log_mean_exp(v), np.log(np.mean(np.exp(v), 0)), rtol=1e-6)
  np.testing.assert_allclose(
    bounds.log_mean_exp(v, axis=1), np.log(np.mean(np.exp(v), 1)), rtol=1e-6
  )
  big = jnp.array([1000.0, 1000.0, -1000.0])
  assert float(bounds.log_mean_exp(big)) == pytest.approx(1000.0 + math.log(2 / 3), abs=1e-3)
