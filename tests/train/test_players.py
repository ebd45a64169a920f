"""The latent autoencoder's gradient (train/players.py) against a direct computation.

players.autoencoder_gradients takes one backward pass through the autoencoder and builds LDM's
adaptive weight from the heads' gradients at the reconstruction. Here the same loss is written
out plainly, as LDM's PyTorch code computes it: the adaptive weight from two gradients of the
whole loss terms with respect to the decoder's last kernel, then the gradient of the weighted
total. Both must agree on every parameter.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxvae import weights
from flaxvae.models import discriminator
from flaxvae.models.noise import NoiseSource
from flaxvae.objectives import adversarial, bounds, perceptual
from flaxvae.run import Run
from flaxvae.train import players
from flaxvae.train import step as step_lib
from tests import conftest

SHAPE = (28, 28, 1)


def random_lpips_weights(seed=0):
  rng = np.random.default_rng(seed)
  flat = {
    key: (rng.normal(0.0, 0.05, shape) if "vgg16" in key else rng.uniform(0.0, 0.1, shape))
    for key, shape in perceptual.weight_shapes().items()
  }
  return jax.tree.map(jnp.float32, weights.unflatten(flat))


# Eager differentiation of LDM's loss: a minute per case, so both run with the slow tests
# (CI's make test-slow); the fast tests/train/test_two_players.py trains the same step through
# train() and checks its logged terms
@pytest.mark.slow
@pytest.mark.parametrize("adaptive", [True, False])
def test_one_backward_pass_gives_the_gradient_of_ldms_loss(adaptive, monkeypatch):
  config = conftest.set_keys(
    conftest.load_config("fashion_mnist_kl_f4", "tiny"),
    **{"adversary.start_step": 0, "adversary.adaptive_weight": adaptive},
  )
  run = Run(config, conftest.array_dataset(16, 8, SHAPE), for_training=False)
  d_graphdef = discriminator.split_discriminator(run._discriminator(None))[0]
  adversary = players.adversary_step(run.settings.adversary, d_graphdef, run.adversary_tx)
  cfg = step_lib.step_config(run.settings, adversary)
  state = run.initial_state()
  lpips_weights = random_lpips_weights()
  x = conftest.random_images(4, 2, SHAPE).astype(np.float32) / 255.0
  noise = NoiseSource.from_key(jax.random.key(3), x.shape[0])
  layout = step_lib.Layout(batch_axes=None)
  beta = run.settings.objective.beta

  with jax.default_matmul_precision("highest"):
    values, grads = players.autoencoder_gradients(
      run.graphdef, cfg, layout, state, state.params, x, noise, beta, lpips_weights
    )

    model_of = lambda params: run.model_with(params)
    pixels = np.prod(SHAPE)

    def terms(params):
      rec = model_of(params).reconstruct_for_training(x, noise)
      image = run.likelihood.mean(rec.raw)
      distortion = -run.likelihood.log_prob(rec.raw, x)
      lpips = perceptual.lpips(lpips_weights, 2 * x - 1, 2 * image - 1)
      nll = jnp.mean(distortion + cfg.perceptual_weight * pixels * lpips)
      rate = jnp.mean(bounds.layer_kl(rec.layers[0])[0])
      logits, _ = discriminator.discriminate(
        d_graphdef, state.adversary.params, state.adversary.stats, 2 * image - 1
      )
      return nll, rate, adversarial.generator_loss(adversary.loss, logits)

    last = lambda g: g["decoder"]["conv_out"]["kernel"]
    nll_grads = jax.grad(lambda p: terms(p)[0])(state.params)
    g_grads = jax.grad(lambda p: terms(p)[2])(state.params)
    weight = adversary.weight
    if adaptive:  # LDM: |grad nll| / (|grad g| + 1e-4) at the last layer, clipped, detached
      ratio = jnp.linalg.norm(last(nll_grads)) / (jnp.linalg.norm(last(g_grads)) + 1e-4)
      weight = weight * jnp.clip(ratio, 0.0, 1e4)
    total = lambda p: (lambda nll, rate, g: nll + beta * rate + weight * g)(*terms(p))
    expected = jax.grad(total)(state.params)

  np.testing.assert_allclose(values["adaptive_weight"], weight, rtol=1e-4)
  largest = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(expected))
  for (path, got), want in zip(jax.tree.leaves_with_path(grads), jax.tree.leaves(expected)):
    # A key's bias has a zero gradient up to rounding (see rounding_only): both sides ~0.
    scale = largest if rounding_only(path) else float(np.max(np.abs(want))) + 1e-12
    np.testing.assert_allclose(
      got, want, rtol=1e-4, atol=1e-4 * scale, err_msg=jax.tree_util.keystr(path)
    )


def rounding_only(path):
  """Whether the parameter at `path` (a key path) is an attention key's bias: it adds the same
  q.b to every logit of a query, which softmax cancels, so its gradient is zero up to rounding
  (and Adam scales that rounding to steps of the learning rate whose signs depend on the
  summation order: it changes no output)."""
  name = jax.tree_util.keystr(path)
  return "to_k" in name and "bias" in name
