"""Inverse autoregressive flow posteriors (Kingma et al. 2016).

q(z|x) starts as the encoder's diagonal Gaussian, z_0 = mean + sigma * eps, and each step
applies an affine autoregressive map z_t = sigma_t * z_{t-1} + m_t whose (m_t, log sigma_t)
for unit d depend only on units before d (a MADE network) and on a context vector the
encoder emits. The Jacobian is triangular, so log q(z_T|x) = log q(z_0|x) - sum_t sum_d log
sigma_t,d: still a sum over units, which the contract's per-unit KL needs. Steps alternate
the unit order. sigma_t = 2 * sigmoid(s_t) keeps every step's scale in (0, 2), and the last
layers start at zero, so an untrained flow is the identity: q is then exactly the Gaussian.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxvae.models import layers
from flaxvae.objectives import elementwise


class MaskedDense(nnx.Module):
  """A dense layer whose kernel is multiplied by a fixed 0/1 mask (the MADE connectivity).

  The mask is rebuilt from static sizes at trace time (a constant of the compiled step), never
  held as a Variable: the trainer optimises every array of the model's state, and a mask the
  optimizer can move breaks the autoregressive structure, so sum(log sigma) is no longer the
  log-determinant and log q(z|x) no longer a density (a training run then drove the "KL" to
  -65 nats).
  """

  def __init__(self, latent_dim, hidden, reverse, part, rngs, dtype, zero_init=False):
    self.latent_dim, self.hidden, self.reverse, self.part = latent_dim, hidden, reverse, part
    fan_in, fan_out = self.mask().shape
    init = nnx.initializers.zeros if zero_init else nnx.initializers.lecun_normal()
    self.kernel = nnx.Param(init(rngs.params(), (fan_in, fan_out), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((fan_out,), jnp.float32))
    self.dtype = dtype

  def mask(self):
    """This layer's 0/1 mask: part 0 is input -> hidden, part 1 hidden -> output."""
    return made_masks(self.latent_dim, self.hidden, self.reverse)[self.part]

  def __call__(self, h):
    kernel = (self.kernel[...] * jnp.asarray(self.mask(), jnp.float32)).astype(self.dtype)
    return h.astype(self.dtype) @ kernel + self.bias[...].astype(self.dtype)


def made_masks(latent_dim, hidden, reverse):
  """(input->hidden, hidden->output) masks: output d sees inputs strictly before d in the order."""
  order = np.arange(latent_dim)[::-1] if reverse else np.arange(latent_dim)
  degree_in = np.empty(latent_dim, int)
  degree_in[order] = np.arange(1, latent_dim + 1)
  degree_hidden = (
    (np.arange(hidden) % max(latent_dim - 1, 1)) + 1
    if latent_dim > 1
    else np.full(hidden, latent_dim + 1)
  )  # one unit: hidden units see no input unit, only the context
  to_hidden = degree_hidden[None, :] >= degree_in[:, None]
  to_output = degree_in[None, :] > degree_hidden[:, None]
  return to_hidden, to_output


class IAFStep(nnx.Module):
  def __init__(self, latent_dim, context_dim, hidden, reverse, rngs, dtype):
    self.from_z = MaskedDense(latent_dim, hidden, reverse, 0, rngs, dtype)
    self.from_context = layers.dense(context_dim, hidden, rngs, dtype, use_bias=False)
    self.to_shift = MaskedDense(latent_dim, hidden, reverse, 1, rngs, dtype, zero_init=True)
    self.to_scale = MaskedDense(latent_dim, hidden, reverse, 1, rngs, dtype, zero_init=True)

  def __call__(self, z, context):
    h = jax.nn.elu(self.from_z(z) + self.from_context(context))
    shift = self.to_shift(h).astype(jnp.float32)
    log_sigma = elementwise.log_sigmoid(self.to_scale(h).astype(jnp.float32)) + jnp.log(2.0)
    return jnp.exp(log_sigma) * z + shift, log_sigma


class IAF(nnx.Module):
  """`steps` IAF steps; returns z_T and sum_t log sigma_t per unit."""

  def __init__(self, latent_dim, context_dim, steps, hidden, rngs, dtype):
    self.steps = nnx.List(
      [
        IAFStep(latent_dim, context_dim, hidden, reverse=bool(t % 2), rngs=rngs, dtype=dtype)
        for t in range(steps)
      ]
    )

  def __call__(self, z, context):
    context = jnp.broadcast_to(context, (*z.shape[:-1], context.shape[-1]))
    total = jnp.zeros_like(z)
    for step in self.steps:
      z, log_sigma = step(z, context)
      total = total + log_sigma
    return z, total
