"""The adversarial terms of LDM's autoencoder objective, as pure functions of arrays.

Why pure functions: the train step runs both players in one jitted function under shard_map;
these take logits (any shape, reduced by plain means, float32) and return scalars, so the step
decides what is differentiated, stopped or averaged over devices. Means over equal per-device
shards average to the global mean once the step pmeans them.

LDM (latent-diffusion `contperceptual.py`, from taming `vqperceptual.py`):
  discriminator, hinge           0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))
  discriminator, non_saturating  0.5 * (mean softplus(-D(x)) + mean softplus(D(x_hat)))
                                 (taming's "vanilla")
  generator, hinge               -mean D(x_hat)             (LDM uses it with either D loss)
  generator, non_saturating      mean softplus(-D(x_hat))
  adaptive weight                ||grad nll|| / (||grad g_loss|| + 1e-4) at the decoder's last
                                 layer, clamped to [0, 1e4], no gradient; the caller multiplies
                                 it by adversary.weight.
Regularisers of the discriminator (not in LDM):
  LeCam (Tseng et al. 2021, "Regularizing Generative Adversarial Networks under Limited Data",
  https://arxiv.org/abs/2104.03310; official code google/lecam-gan, `lecam_reg` in
  biggan_cifar/losses.py and `lecamreg` in stylegan2/lecam_loss.py):
      R_LC = mean(relu(D(x) - ema_fake)^2) + mean(relu(ema_real - D(x_hat))^2)
  with ema_real, ema_fake exponential moving averages (decay 0.99 there) of the batch-mean
  logits, updated with the current batch BEFORE the penalty is computed (both official
  versions), and carrying no gradient.
  R1 (Mescheder et al. 2018): mean over the batch of ||d sum(D(x)) / d x||^2 at real images;
  the caller multiplies it by r1_weight / 2 (StyleGAN2's gamma / 2).
"""

import jax
import jax.numpy as jnp

from flaxvae.errors import ConfigError
from flaxvae.objectives import elementwise

LOSSES = ("hinge", "non_saturating")


def _f32_mean(x):
  return jnp.mean(jnp.asarray(x, jnp.float32))


def _check(kind):
  if kind not in LOSSES:
    raise ConfigError(f"unknown adversary.loss {kind!r}: use one of {', '.join(LOSSES)}")


def discriminator_loss(kind, logits_real, logits_fake):
  """The discriminator's loss (to minimise) on real and generated images' logits."""
  _check(kind)
  real, fake = jnp.asarray(logits_real, jnp.float32), jnp.asarray(logits_fake, jnp.float32)
  if kind == "hinge":
    return 0.5 * (_f32_mean(jax.nn.relu(1.0 - real)) + _f32_mean(jax.nn.relu(1.0 + fake)))
  return 0.5 * (_f32_mean(elementwise.softplus(-real)) + _f32_mean(elementwise.softplus(fake)))


def generator_loss(kind, logits_fake):
  """The generator's adversarial loss (to minimise) on its images' logits."""
  _check(kind)
  fake = jnp.asarray(logits_fake, jnp.float32)
  if kind == "hinge":
    return -_f32_mean(fake)
  return _f32_mean(elementwise.softplus(-fake))


def _global_norm(tree):
  leaves = jax.tree.leaves(tree)
  return jnp.sqrt(sum(jnp.sum(jnp.square(jnp.asarray(g, jnp.float32))) for g in leaves))


def adaptive_weight(nll_grads, adv_grads, max_weight=1e4, eps=1e-4):
  """LDM's adaptive weight: ||nll_grads|| / (||adv_grads|| + eps), clipped to [0, max_weight],
  under stop_gradient. The gradients are pytrees (the decoder's last kernel in LDM); norms are
  global L2 norms over all their leaves, in float32."""
  ratio = _global_norm(nll_grads) / (_global_norm(adv_grads) + eps)
  return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, max_weight))


def lecam_penalty(logits_real, logits_fake, ema_real, ema_fake):
  """R_LC = mean(relu(D(x) - ema_fake)^2) + mean(relu(ema_real - D(x_hat))^2), the EMAs under
  stop_gradient (pass the EMAs already updated with this batch, as the official code does)."""
  real, fake = jnp.asarray(logits_real, jnp.float32), jnp.asarray(logits_fake, jnp.float32)
  ema_real, ema_fake = jax.lax.stop_gradient((ema_real, ema_fake))
  return _f32_mean(jnp.square(jax.nn.relu(real - ema_fake))) + _f32_mean(
    jnp.square(jax.nn.relu(ema_real - fake))
  )


def lecam_ema_update(ema_real, ema_fake, logits_real, logits_fake, decay, axis_name=None):
  """(ema_real, ema_fake) moved towards this batch's mean logits: ema <- decay * ema +
  (1 - decay) * mean(logits), no gradient. `axis_name`: the mesh's batch axes, so every device
  holds the global batch's EMAs. `decay` may be traced (0 on the first step starts the EMAs at
  the first batch's means, as the official code's start_itr does)."""

  def batch_mean(logits):
    mean = _f32_mean(jax.lax.stop_gradient(logits))
    return mean if axis_name is None else jax.lax.pmean(mean, axis_name)

  decay = jnp.asarray(decay, jnp.float32)
  move = lambda ema, logits: (
    decay * jnp.asarray(ema, jnp.float32) + (1 - decay) * batch_mean(logits)
  )
  return move(ema_real, logits_real), move(ema_fake, logits_fake)


def r1_penalty(logits_fn, real_images):
  """Mean over the batch of ||d sum(logits_fn(x)) / d x||^2 at x = real_images (the sum runs over
  each example's patch logits; the gradient flows to logits_fn's parameters through its closure
  when the caller differentiates this). Times r1_weight / 2 by the caller."""
  grads = jax.grad(lambda x: jnp.sum(jnp.asarray(logits_fn(x), jnp.float32)))(real_images)
  squares = jnp.square(grads.astype(jnp.float32))
  return jnp.mean(jnp.sum(squares, axis=tuple(range(1, squares.ndim))))
