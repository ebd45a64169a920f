"""softplus and log_sigmoid in the form XLA:CPU runs fast, with exact gradients.

jax.nn.softplus is logaddexp(x, 0), whose guards for infinities and NaNs cost more than the
arithmetic: they kept the default model's importance pass far from its FLOP limit, and
max(x, 0) + log1p(exp(-|x|)) brings the pass back near it (docs/evaluation.md; BENCHMARKS.md,
the evaluation section). The same values to float32 rounding; infinities give what softplus
gives.

The derivative is written out (custom_jvp) because autodiff of max and |x| gives 0 at x = 0,
where the slope is 1/2, and zero inputs are common: zero-initialised last layers.
"""

import jax
import jax.numpy as jnp


def _softplus_and_exp(x):
  """(softplus(x), exp(-|x|)): the value and the exponential its slope reuses."""
  e = jnp.exp(-jnp.abs(x))
  return jnp.maximum(x, 0) + jnp.log1p(e), e


@jax.custom_jvp
def softplus(x):
  """log(1 + exp(x)), elementwise."""
  return _softplus_and_exp(x)[0]


@softplus.defjvp
def _softplus_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  y, e = _softplus_and_exp(x)
  sigmoid = jnp.where(x >= 0, 1.0, e) / (1.0 + e)  # sigmoid(x), from the same exponential
  return y, sigmoid * t


def log_sigmoid(x):
  """log(sigmoid(x)) = -softplus(-x)."""
  return -softplus(-x)
