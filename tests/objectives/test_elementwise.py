"""flaxvae's softplus and log_sigmoid against jax.nn: values, slopes (at 0 too), infinities."""

import jax
import jax.numpy as jnp
import numpy as np

from flaxvae.objectives import elementwise


def test_softplus_matches_jax_in_value_and_slope_everywhere():
  x = jnp.concatenate([jnp.linspace(-100.0, 100.0, 20_001), jnp.zeros(1)])
  np.testing.assert_allclose(elementwise.softplus(x), jax.nn.softplus(x), rtol=1e-6, atol=1e-7)
  slope = jax.vmap(jax.grad(elementwise.softplus))(x)
  np.testing.assert_allclose(slope, jax.nn.sigmoid(x), rtol=1e-5, atol=1e-12)
  assert float(jax.grad(elementwise.softplus)(0.0)) == 0.5  # autodiff of max and |x| says 0
  curvature = jax.vmap(jax.grad(jax.grad(elementwise.softplus)))(x[::100])
  e = np.exp(-np.abs(np.asarray(x[::100], np.float64)))
  np.testing.assert_allclose(curvature, e / (1 + e) ** 2, rtol=1e-4, atol=1e-30)


def test_softplus_and_log_sigmoid_at_the_infinities():
  x = jnp.array([-jnp.inf, jnp.inf])
  np.testing.assert_array_equal(elementwise.softplus(x), [0.0, jnp.inf])
  np.testing.assert_array_equal(elementwise.log_sigmoid(x), [-jnp.inf, 0.0])
  np.testing.assert_array_equal(jax.vmap(jax.grad(elementwise.softplus))(x), [0.0, 1.0])
  assert bool(jnp.isnan(elementwise.softplus(jnp.nan)))
  np.testing.assert_allclose(
    elementwise.log_sigmoid(jnp.linspace(-50.0, 50.0, 101)),
    jax.nn.log_sigmoid(jnp.linspace(-50.0, 50.0, 101)),
    rtol=1e-6,
    atol=1e-7,
  )
