"""The adversarial losses and regularisers against values worked out by hand or in closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxvae.errors import ConfigError
from flaxvae.objectives import adversarial as adv

REAL = np.array([[2.0, 0.5], [-1.0, 0.0]], np.float32)
FAKE = np.array([[-3.0, 0.25], [1.5, -0.5]], np.float32)


def test_hinge_losses_by_hand():
  # real: relu(1 - [2, .5, -1, 0]) = [0, .5, 2, 1] -> mean .875
  # fake: relu(1 + [-3, .25, 1.5, -.5]) = [0, 1.25, 2.5, .5] -> mean 1.0625
  np.testing.assert_allclose(adv.discriminator_loss("hinge", REAL, FAKE), 0.5 * (0.875 + 1.0625))
  np.testing.assert_allclose(adv.generator_loss("hinge", FAKE), -(-3 + 0.25 + 1.5 - 0.5) / 4)


def test_non_saturating_losses_by_hand():
  softplus = lambda x: np.log1p(np.exp(np.float64(x)))
  want_d = 0.5 * (np.mean(softplus(-REAL)) + np.mean(softplus(FAKE)))
  np.testing.assert_allclose(adv.discriminator_loss("non_saturating", REAL, FAKE), want_d, 1e-6)
  want_g = np.mean(softplus(-FAKE))
  np.testing.assert_allclose(adv.generator_loss("non_saturating", FAKE), want_g, rtol=1e-6)
  # softplus(-x) = -log sigmoid(x): the non-saturating loss is the cross-entropy with label 1
  np.testing.assert_allclose(adv.generator_loss("non_saturating", [0.0]), np.log(2.0), 1e-6)


def test_bfloat16_logits_reduce_in_float32():
  loss = adv.discriminator_loss("hinge", jnp.asarray(REAL, jnp.bfloat16), FAKE)
  assert loss.dtype == jnp.float32


def test_an_unknown_loss_is_one_line():
  with pytest.raises(ConfigError, match=r"unknown adversary.loss 'wgan': use one of hinge"):
    adv.discriminator_loss("wgan", REAL, FAKE)
  with pytest.raises(ConfigError) as info:
    adv.generator_loss("wgan", FAKE)
  assert "\n" not in str(info.value)


def test_adaptive_weight_on_a_linear_last_layer():
  # raw = W f, nll = sum((raw - y)^2), g_loss = -sum(v * raw): dnll/dW = 2 (W f - y) f^T and
  # dg/dW = -v f^T: rank one, so their Frobenius norms are 2 ||W f - y|| ||f|| and ||v|| ||f||.
  w = jnp.array([[1.0, -2.0], [0.5, 3.0]])
  f, y, v = jnp.array([1.0, 2.0]), jnp.array([0.0, 1.0]), jnp.array([3.0, 4.0])
  nll_grads = jax.grad(lambda w: jnp.sum(jnp.square(w @ f - y)))(w)
  adv_grads = jax.grad(lambda w: -jnp.sum(v * (w @ f)))(w)
  residual = np.array([1 - 4, 0.5 + 6 - 1])  # W f - y = [-3, 5.5]
  norm_nll = 2 * np.linalg.norm(residual) * np.linalg.norm(f)
  norm_adv = np.linalg.norm(v) * np.linalg.norm(f)
  want = norm_nll / (norm_adv + 1e-4)
  got = adv.adaptive_weight({"kernel": nll_grads}, {"kernel": adv_grads})
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # pytrees: global norms over every leaf, here both sqrt(2) times the single leaf's
  both = adv.adaptive_weight((nll_grads, nll_grads), (adv_grads, adv_grads))
  want_both = np.sqrt(2) * norm_nll / (np.sqrt(2) * norm_adv + 1e-4)
  np.testing.assert_allclose(both, want_both, rtol=1e-6)


def test_adaptive_weight_is_clipped_and_passes_no_gradient():
  big = adv.adaptive_weight(jnp.ones(3), jnp.zeros(3))  # ||g|| / 1e-4 = 17320.5 > 1e4
  np.testing.assert_allclose(big, 1e4)
  np.testing.assert_allclose(adv.adaptive_weight(jnp.ones(3), jnp.zeros(3), max_weight=50.0), 50)
  grad = jax.grad(lambda s: adv.adaptive_weight(s * jnp.ones(2), jnp.ones(2)))(1.0)
  assert grad == 0.0
  assert adv.adaptive_weight(jnp.zeros(2), jnp.ones(2)) == 0.0


def test_lecam_penalty_against_its_formula():
  ema_real, ema_fake = 0.75, -0.25
  # relu(real - ema_fake) = relu([2.25, .75, -.75, .25]) -> squares [5.0625, .5625, 0, .0625]
  # relu(ema_real - fake) = relu([3.75, .5, -.75, 1.25]) -> squares [14.0625, .25, 0, 1.5625]
  want = (5.0625 + 0.5625 + 0.0625) / 4 + (14.0625 + 0.25 + 1.5625) / 4
  np.testing.assert_allclose(adv.lecam_penalty(REAL, FAKE, ema_real, ema_fake), want, 1e-6)
  # the EMAs carry no gradient; the logits do
  grad_ema = jax.grad(lambda e: adv.lecam_penalty(REAL, FAKE, e, e))(0.5)
  assert grad_ema == 0.0
  grad_real = jax.grad(lambda r: adv.lecam_penalty(r, FAKE, ema_real, ema_fake))(REAL)
  np.testing.assert_allclose(grad_real, 2 * np.maximum(REAL - ema_fake, 0) / REAL.size, 1e-6)


def test_lecam_ema_update():
  real, fake = adv.lecam_ema_update(1.0, -2.0, REAL, FAKE, 0.9)
  np.testing.assert_allclose(real, 0.9 * 1.0 + 0.1 * REAL.mean(), rtol=1e-6)
  np.testing.assert_allclose(fake, 0.9 * -2.0 + 0.1 * FAKE.mean(), rtol=1e-6)
  first = adv.lecam_ema_update(123.0, 456.0, REAL, FAKE, 0.0)  # decay 0: the batch means
  np.testing.assert_allclose(first, (REAL.mean(), FAKE.mean()), rtol=1e-6)
  grad = jax.grad(lambda r: adv.lecam_ema_update(0.0, 0.0, r, FAKE, 0.5)[0])(REAL)
  np.testing.assert_array_equal(grad, 0.0)


def test_lecam_ema_update_averages_over_devices():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  logits = np.arange(16, dtype=np.float32).reshape(8, 2)

  def per_device(real):
    return adv.lecam_ema_update(0.0, 0.0, real, -real, 0.5, axis_name="data")

  fn = jax.jit(
    jax.shard_map(per_device, mesh=mesh, in_specs=jax.P("data"), out_specs=jax.P(), check_vma=False)
  )
  real, fake = fn(jax.device_put(logits, jax.NamedSharding(mesh, jax.P("data"))))
  np.testing.assert_allclose((real, fake), (0.5 * 7.5, -0.5 * 7.5))


def test_r1_of_a_linear_discriminator_is_the_squared_weight_norm():
  w = jnp.array([[0.5], [-2.0], [1.5]])  # D(x) = x . w per pixel, summed over a 2x2 patch map
  images = jax.random.normal(jax.random.key(0), (4, 2, 2, 3))
  logits_fn = lambda x: x @ w  # [b, 2, 2, 1]
  # d sum(D) / d x = w at every pixel: ||grad||^2 = (pixels) * ||w||^2 per example
  want = 4 * float(jnp.sum(w**2))
  np.testing.assert_allclose(adv.r1_penalty(logits_fn, images), want, rtol=1e-6)
  # it differentiates through to the discriminator's weights: d/dw (4 ||w||^2) = 8 w
  grad_w = jax.grad(lambda w: adv.r1_penalty(lambda x: x @ w, images))(w)
  np.testing.assert_allclose(grad_w, 8 * w, rtol=1e-6)


def test_r1_of_a_quadratic_discriminator():
  # D(x) = 0.5 sum(x^2): grad = x, so the penalty is the mean squared norm of the images
  images = jax.random.normal(jax.random.key(1), (3, 2, 2, 1))
  got = adv.r1_penalty(lambda x: 0.5 * jnp.sum(x**2, axis=(1, 2, 3)), images)
  np.testing.assert_allclose(got, np.mean(np.sum(np.asarray(images) ** 2, (1, 2, 3))), 1e-6)
