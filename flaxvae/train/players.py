"""The latent autoencoder's objective: LDM's reconstruction, perceptual and adversarial terms,
and the discriminator's own update, both players in the one jitted step (train/step.py).

The autoencoder's loss per example is LDM's (latent-diffusion's LPIPSWithDiscriminator):

    -log p(x|z) + beta * KL(q(z|x) || p(z)) + perceptual_weight * LPIPS(x, x_hat) * H*W*C
        + d_weight * generator_loss(D(x_hat))

with log p(x|z) and the KL summed over pixels and latent elements, and the batch mean taken
last, so LDM's kl_weight (1e-6) is `objective.beta` as it is. LPIPS is one value per image,
counted once per pixel as LDM broadcasts it. d_weight is LDM's adaptive weight: the norm of
the gradient of the reconstruction terms at the decoder's last layer over that of the
adversarial term, clipped and not differentiated, times `adversary.weight`; it is zero before
`adversary.start_step`.

The gradient costs one backward pass through the autoencoder. The step computes the forward
pass with `jax.vjp`, then the two heads' gradients with respect to the reconstruction (LPIPS's
and the discriminator's backward passes, once each), the two last-layer gradients the
adaptive weight needs from those (a 3x3 convolution each), and sends the weighted sum back
through the autoencoder once. (LDM's `torch.autograd.grad` calls run the heads' backward
passes twice.) The last-layer gradients are the mean over every device's rows, so the weight,
like everything else, does not depend on the device count.

The discriminator then takes its own step on the same batch: the real images and the
reconstruction (not differentiated), hinge or non-saturating loss, optional LeCam and R1
terms, its own optimizer, guards and skip counters. BatchNorm normalises each call with the
global batch's statistics (two calls, real then reconstructed, as taming's loss does). Both
players see the reconstruction of the same forward pass (simultaneous updates; LDM's second
optimizer recomputes it after the first update). Before `adversary.train_start` (and before
`adversary.start_step` for its term in the autoencoder's loss) the discriminator's branch is not
run on accelerators (`lax.cond`); on XLA:CPU, where a conditional's convolutions take the slow
path, the program selects between both branches (runtime/backend.py `branch`), and the host
dispatches the steps before the first of the two starts to a second program without them
(`AdversaryStep.waiting`, step.build_train_fn).
"""

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flaxvae.models import contract
from flaxvae.objectives import adversarial, bounds, perceptual
from flaxvae.runtime import backend
from flaxvae.train import guards


class AdversaryState(NamedTuple):
  """The discriminator's part of the train state, checkpointed with the rest."""

  params: Any  # pure dict of float32 arrays
  stats: Any  # BatchNorm running statistics (pure dict; {} without BatchNorm)
  opt_state: Any
  skipped: jax.Array  # int32: discriminator steps skipped (non-finite or too large gradients)
  consecutive_skips: jax.Array  # int32
  guard: Any  # guards.py window of recent gradient norms, () when adaptive_skip is 0
  lecam: jax.Array  # [2] float32: EMAs of the mean real and fake logits (LeCam)


@dataclasses.dataclass(frozen=True)
class AdversaryStep:
  """What the step needs of `adversary` settings: static, closed over by the jitted step."""

  graphdef: Any = dataclasses.field(compare=False)
  tx: Any = dataclasses.field(compare=False)
  loss: str
  weight: float
  adaptive_weight: bool
  max_adaptive_weight: float
  start_step: int
  train_start: int
  lecam_weight: float
  lecam_decay: float
  r1_weight: float
  # guards.py reads these (as StepConfig's); grad_clip_norm clips the discriminator's gradient
  skip_nonfinite: bool
  skip_threshold: float
  adaptive_skip: float
  adaptive_skip_quantile: float
  grad_clip_norm: float
  # True in the program the host runs for dispatches wholly before first_active_step
  # (step.build_train_fn, on XLA:CPU): the discriminator's branches are left out and its state
  # passes through, as the full program's inactive branches give
  waiting: bool = False

  @property
  def first_active_step(self):
    """The first step at which anything the discriminator does reaches the state."""
    return min(self.start_step, self.train_start)


def adversary_step(settings, graphdef, tx):
  """AdversaryStep from settings.AdversarySettings."""
  a, o = settings, settings.optimizer
  return AdversaryStep(
    graphdef=graphdef,
    tx=tx,
    loss=a.loss,
    weight=a.weight,
    adaptive_weight=a.adaptive_weight,
    max_adaptive_weight=a.max_adaptive_weight,
    start_step=a.start_step,
    train_start=a.first_training_step,
    lecam_weight=a.lecam_weight,
    lecam_decay=a.lecam_decay,
    r1_weight=a.r1_weight,
    skip_nonfinite=o.skip_nonfinite,
    skip_threshold=o.skip_threshold,
    adaptive_skip=o.adaptive_skip,
    adaptive_skip_quantile=o.adaptive_skip_quantile,
    grad_clip_norm=o.grad_clip_norm,
  )


def initial_adversary(params, stats, tx, optimizer_settings):
  """The AdversaryState at step 0 of a discriminator's initial `params` and BatchNorm `stats`
  (pure dicts)."""
  return AdversaryState(
    params=params,
    stats=stats,
    opt_state=tx.init(params),
    skipped=jnp.zeros((), jnp.int32),
    consecutive_skips=jnp.zeros((), jnp.int32),
    guard=guards.init(optimizer_settings.adaptive_skip, optimizer_settings.adaptive_skip_window),
    lecam=jnp.zeros((2,), jnp.float32),
  )


def to_signed(images01):
  """[0, 1] images -> LDM's [-1, 1], what LPIPS and the discriminator see."""
  return 2.0 * images01 - 1.0


RECONSTRUCTION = "reconstruction"  # the values' key of the [0, 1] reconstruction (not a metric)


def autoencoder_gradients(graphdef, cfg, layout, state, whole, x, noise, kl_scale, lpips_weights):
  """(values, gradients) of the autoencoder's loss on this device's rows (see the module
  docstring) at the whole parameters `whole`; the gradients are not yet reduced over devices.
  values holds the batch means of the metrics and, under RECONSTRUCTION, the reconstruction
  the discriminator trains on."""
  likelihood = nnx.merge(graphdef, state.params).likelihood  # a static part of the graph
  pixels = math.prod(x.shape[1:])
  adversary = cfg.adversary

  def forward(params):
    rec = nnx.merge(graphdef, params).reconstruct_for_training(x, noise)
    rate = jnp.sum(jnp.stack([bounds.layer_kl(layer) for layer in rec.layers]), axis=0)[0]
    return (rec.raw, jnp.mean(rate)), (rec.features, rec.layers)

  (raw, _), pullback, (features, latent_layers) = jax.vjp(forward, whole, has_aux=True)

  def reconstruction_head(raw):
    log_px_z = likelihood.log_prob(raw, x)
    terms = contract.Terms(log_px_z[None], latent_layers)
    values = bounds.per_example(terms, "elbo", kl_scale)
    distance = jnp.zeros_like(log_px_z)
    if cfg.perceptual_weight:
      distance = perceptual.lpips(lpips_weights, to_signed(x), to_signed(likelihood.mean(raw)))
    nll = values["distortion"] + cfg.perceptual_weight * pixels * distance
    return jnp.mean(nll), dict(values, perceptual=distance, loss=values["loss"])

  _, reconstruction_pullback, values = jax.vjp(reconstruction_head, raw, has_aux=True)
  (toward_reconstruction,) = reconstruction_pullback(jnp.ones((), jnp.float32))
  cotangent = toward_reconstruction
  metrics = {}
  if adversary is not None:
    active = False if adversary.waiting else state.step >= adversary.start_step

    def adversarial_term(_):
      def head(raw):
        images = to_signed(likelihood.mean(raw))
        logits, _ = discriminate(adversary, state.adversary, layout, images)
        return adversarial.generator_loss(adversary.loss, logits)

      g_loss, head_pullback = jax.vjp(head, raw)
      (toward_adversary,) = head_pullback(jnp.ones((), jnp.float32))
      weight = jnp.float32(adversary.weight)
      if adversary.adaptive_weight:
        model = nnx.merge(graphdef, whole)
        last = _at(whole, model.OUTPUT_LAYER)
        _, last_pullback = jax.vjp(lambda p: model.output_layer(p, features), last)
        at_last = lambda c: bounds.device_mean(last_pullback(c)[0]["kernel"], layout.batch_axes)
        weight = weight * adversarial.adaptive_weight(
          at_last(toward_reconstruction),
          at_last(toward_adversary),
          max_weight=adversary.max_adaptive_weight,
        )
      return g_loss, weight, toward_adversary

    def inactive(_):
      return jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jnp.zeros_like(raw)

    g_loss, d_weight, toward_adversary = backend.branch(active, adversarial_term, inactive)
    cotangent = cotangent + d_weight * toward_adversary
    metrics = dict(generator_loss=g_loss, adaptive_weight=d_weight)
  # Gradients of this device's batch mean, as the ELBO path's: layout.reduce averages them.
  grads = pullback((cotangent, jnp.asarray(kl_scale, jnp.float32)))[0]
  values = jax.tree.map(lambda v: jnp.mean(v, axis=0), values)
  values["loss"] = values["loss"] + cfg.perceptual_weight * pixels * values["perceptual"]
  if adversary is not None:
    values["loss"] = values["loss"] + metrics["adaptive_weight"] * metrics["generator_loss"]
  if adversary is not None:
    metrics[RECONSTRUCTION] = jax.lax.stop_gradient(likelihood.mean(raw))
  return dict(values, **metrics), grads


def discriminate(adversary, adversary_state, layout, images, stats=None):
  """Discriminator logits of `images` ([-1, 1]) with the whole parameters, and its new stats."""
  from flaxvae.models import discriminator  # noqa: PLC0415  (models import objectives)

  whole = _adversary_layout(layout).gather(adversary_state.params)
  return discriminator.discriminate(
    adversary.graphdef,
    whole,
    adversary_state.stats if stats is None else stats,
    images,
    train=True,
  )


def _adversary_layout(layout):
  return layout._replace(param_dims=layout.adversary_dims)


def discriminator_update(adversary: AdversaryStep, layout, state, real01, fake01):
  """The discriminator's step on this batch: (new AdversaryState, metrics)."""
  from flaxvae.models import discriminator  # noqa: PLC0415

  current = state.adversary
  d_layout = _adversary_layout(layout)
  real, fake = to_signed(real01), jax.lax.stop_gradient(to_signed(fake01))

  def loss_fn(params):
    call = lambda stats, images: discriminator.discriminate(
      adversary.graphdef, params, stats, images, train=True
    )
    logits_real, stats = call(current.stats, real)
    logits_fake, stats = call(stats, fake)
    loss = adversarial.discriminator_loss(adversary.loss, logits_real, logits_fake)
    # The first training step starts LeCam's EMAs at its batch's means (decay 0).
    decay = jnp.where(state.step == adversary.train_start, 0.0, adversary.lecam_decay)
    lecam = jnp.stack(
      adversarial.lecam_ema_update(
        current.lecam[0], current.lecam[1], logits_real, logits_fake, decay, layout.batch_axes
      )
    )
    if adversary.lecam_weight:  # with the EMAs updated by this batch, as the official code
      loss = loss + adversary.lecam_weight * adversarial.lecam_penalty(
        logits_real, logits_fake, lecam[0], lecam[1]
      )
    if adversary.r1_weight:
      logits_of = lambda images: call(current.stats, images)[0]
      loss = loss + 0.5 * adversary.r1_weight * adversarial.r1_penalty(logits_of, real)
    return loss, (stats, lecam)

  def train(_):
    whole = d_layout.gather(current.params)
    (loss, (stats, lecam)), grads = jax.value_and_grad(loss_fn, has_aux=True)(whole)
    grads = d_layout.reduce(grads)
    loss = bounds.device_mean(loss, layout.batch_axes)
    grad_norm = d_layout.norm(grads)
    if adversary.grad_clip_norm:
      scale = jnp.minimum(1.0, adversary.grad_clip_norm / grad_norm)
      grads = jax.tree.map(lambda g: g * scale, grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if guards.enabled(adversary):
      ok &= grad_norm <= guards.threshold(current.guard, adversary)
    if not (adversary.skip_nonfinite or guards.enabled(adversary)):
      ok = jnp.ones((), bool)

    def update(_):
      updates, opt_state = adversary.tx.update(grads, current.opt_state, current.params)
      return optax.apply_updates(current.params, updates), opt_state, stats

    params, opt_state, stats = jax.lax.cond(
      ok, update, lambda _: (current.params, current.opt_state, current.stats), None
    )
    skipped = (~ok).astype(jnp.int32)
    lecam = jnp.where(ok, lecam, current.lecam)
    new = AdversaryState(
      params,
      stats,
      opt_state,
      current.skipped + skipped,
      (current.consecutive_skips + skipped) * skipped,
      guards.update(current.guard, grad_norm),
      lecam,
    )
    row = dict(
      disc_loss=loss,
      lecam_real=lecam[0],  # the EMAs of the mean logits (LeCam's anchors)
      lecam_fake=lecam[1],
      disc_grad_norm=grad_norm,
      disc_skipped=skipped.astype(jnp.float32),
    )
    return new, row

  def wait(_):
    zero = jnp.zeros((), jnp.float32)
    return current, dict(
      disc_loss=zero, lecam_real=zero, lecam_fake=zero, disc_grad_norm=zero, disc_skipped=zero
    )

  training = False if adversary.waiting else state.step >= adversary.train_start
  return backend.branch(training, train, wait)


def _at(tree, path):
  for key in path:
    tree = tree[key]
  return tree
