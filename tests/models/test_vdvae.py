"""The hierarchical model: scanned and unrolled layers are the same model, rematerialisation
changes memory and not numbers, sampling with per-layer temperatures, latent-level
reconstructions, and every shipped VDVAE config trains two steps on data of its shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxvae import defaults, models, settings
from flaxvae.data import ArrayDataset
from flaxvae.models.noise import NoiseSource
from flaxvae.objectives import bounds, likelihoods
from flaxvae.train import checkpoint as checkpoint_lib
from flaxvae.train.trainer import train
from tests.conftest import load_config, random_images, set_keys

# Deep conv models compile for tens of seconds each on XLA:CPU: `make test-slow` (and CI) runs
# the tests marked slow, `make test` stays under 10 minutes with a tiny model's scan check.
slow = pytest.mark.slow

SHAPE = (12, 12, 1)
SMALL = dict(
  dec_layers="1:2,4:3,16:2",
  enc_blocks="16:2,4:1,1:1",
  widths="16:8,4:12,1:16",
  bottleneck=0.5,
  latent_channels=3,
  pad_to=16,
)
TINY_SHAPE = (4, 4, 1)
TINY = dict(
  dec_layers="4:3", enc_blocks="4:2", widths="4", bottleneck=0.5, latent_channels=2, pad_to=4
)


def build(shape=SHAPE, base=SMALL, **keys):
  model = settings.resolve_model(defaults.model_config("vdvae", **{**base, **keys}))
  return models.create_model(
    model, image_shape=shape, likelihood=likelihoods.get_likelihood("bernoulli")
  )


def x_and_noise(k=2, n=3, shape=SHAPE):
  x = (np.random.default_rng(0).random((n, *shape)) < 0.4).astype(np.float32)
  return x, NoiseSource.per_example(jax.random.split(jax.random.key(1), n), jnp.arange(k))


def jitted(model, method, *args, **static):
  """model.method(*args) under jit (eager execution of a deep model is op by op, slow)."""
  graphdef, state = nnx.split(model)
  return jax.jit(lambda s: getattr(nnx.merge(graphdef, s), method)(*args, **static))(state)


def loss_and_grads(model, x, noise):
  graphdef, params = nnx.split(model)

  def loss(params):
    return -jnp.mean(bounds.per_example(nnx.merge(graphdef, params).terms(x, noise))["elbo"])

  traced = jax.jit(jax.value_and_grad(loss)).trace(params)
  return traced.lower().compile(), params, traced.jaxpr


def test_a_tiny_scanned_model_has_the_unrolled_loss_and_gradients():
  """The scan path, the default on accelerators, in `make test`: the same parameters, loss and
  gradients as the unrolled layers."""
  x, noise = x_and_noise(k=2, n=4, shape=TINY_SHAPE)
  (scanned, params, jaxpr), (unrolled, same_params, unrolled_jaxpr) = [
    loss_and_grads(build(TINY_SHAPE, TINY, scan_blocks=scan), x, noise)
    for scan in ("scan", "unroll")
  ]
  assert "scan[" in str(jaxpr) and "scan[" not in str(unrolled_jaxpr)
  jax.tree.map(np.testing.assert_array_equal, params, same_params)
  (value, grads), (same_value, same_grads) = scanned(params), unrolled(params)
  np.testing.assert_allclose(value, same_value, rtol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, same_grads
  )


@slow
def test_scanned_and_unrolled_layers_compute_the_same_model():
  unrolled, scanned = build(scan_blocks="unroll"), build(scan_blocks="scan")
  assert jax.tree.all(
    jax.tree.map(
      lambda a, b: a.shape == b.shape and bool(jnp.all(a == b)),
      nnx.state(unrolled),
      nnx.state(scanned),
    )
  )
  x, noise = x_and_noise()
  a, b = jitted(unrolled, "terms", x, noise), jitted(scanned, "terms", x, noise)
  np.testing.assert_allclose(bounds.log_weights(a), bounds.log_weights(b), rtol=1e-5)
  for la, lb in zip(a.layers, b.layers):
    np.testing.assert_allclose(la.kl, lb.kl, rtol=1e-4, atol=1e-6)


@slow
def test_remat_changes_memory_not_numbers():
  x, noise = x_and_noise(k=1, n=8)
  results = {}
  for remat in (False, True):
    compiled, params, _ = loss_and_grads(build(remat=remat, scan_blocks="scan"), x, noise)
    value, grads = compiled(params)
    results[remat] = (value, grads, compiled.memory_analysis().temp_size_in_bytes)
  np.testing.assert_allclose(results[True][0], results[False][0], rtol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
    results[True][1],
    results[False][1],
  )
  assert results[True][2] < results[False][2]  # activations recomputed, not stored


@slow
def test_prior_at_zero_is_standard_and_temperature_scales_the_samples():
  model = build()
  x, noise = x_and_noise(k=1)
  terms = jitted(model, "terms", x, noise)
  # The prior's last convolution starts at zero: p(z_l | z_<l) = N(0, I) at initialisation.
  z = terms.layers[-1].z
  expected = -0.5 * jnp.sum((jnp.log(2 * jnp.pi) + z**2).reshape(*z.shape[:2], -1), -1)
  np.testing.assert_allclose(terms.layers[-1].log_p, expected, rtol=1e-5)
  depth = len(model.latent_shapes)
  cold = jitted(model, "sample", jax.random.key(0), 4, 0.0)
  per_layer = jitted(model, "sample", jax.random.key(0), 4, jnp.zeros(depth))
  np.testing.assert_allclose(cold, per_layer, rtol=1e-6)
  assert cold.shape == (4, *SHAPE[:2], 1)
  with pytest.raises(Exception, match="one temperature or one per latent layer"):
    model.sample(jax.random.key(0), 4, temperature=[1.0, 0.5])


@slow
def test_keeping_layers_moves_reconstructions_from_the_prior_to_the_posterior():
  model = build()
  x, noise = x_and_noise(k=1)
  depth = len(model.latent_shapes)
  raws = [jitted(model, "reconstruct", x, noise, keep_layers=keep) for keep in (0, 2, depth)]
  assert all(r.shape == (x.shape[0], *SHAPE[:2], 1) for r in raws)
  assert not np.allclose(raws[0], raws[-1]) and not np.allclose(raws[1], raws[-1])


CONFIGS = [
  "fashion_mnist_vdvae",
  "fashion_mnist_vdvae_8bit",
  "fashion_mnist_effvdvae",
  "cifar10_vdvae",
  "imagenet32_vdvae",
  "imagenet64_vdvae",
  "ffhq256_vdvae",
]
SHAPES = {
  "fashion_mnist": (28, 28, 1),
  "cifar10": (32, 32, 3),
  "imagenet32": (32, 32, 3),
  "imagenet64": (64, 64, 3),
  "ffhq256": (256, 256, 3),
}


@slow
@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_trains_two_steps_on_data_of_its_shape(
  name, tmp_path, compilation_cache
):
  config = load_config(name, "tiny")
  shape = SHAPES[config.data.name]
  dataset = ArrayDataset({"train": random_images(16, 0, shape), "test": random_images(8, 1, shape)})
  row = train(config, str(tmp_path), dataset)
  assert np.isfinite(row["elbo"]) and len(row["rate_by_layer"]) == len(row["active_units_by_layer"])
  assert row["is_probability_model"]  # each shipped protocol and likelihood is a pmf


@slow
def test_vdvae_trains_the_same_on_one_and_eight_devices_and_resumes_bitwise(
  tmp_path, compilation_cache
):
  def tiny(**changes):
    return set_keys(
      load_config("fashion_mnist_vdvae", "tiny"), num_steps=4, log_every_steps=2, **changes
    )

  shape = (28, 28, 1)
  dataset = ArrayDataset({"train": random_images(32, 0, shape), "test": random_images(8, 1, shape)})
  state = lambda run: checkpoint_lib.read_state(tmp_path / run / "checkpoints" / "4" / "state")
  train(tiny(**{"parallel.num_devices": 1}), str(tmp_path / "one"), dataset)
  train(tiny(), str(tmp_path / "eight"), dataset)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
    state("eight")["params"],
    state("one")["params"],
  )

  # Stopped mid-run at step 2 (the time budget ends training at the first log step), resumed.
  train(tiny(time_budget_s=1e-9), str(tmp_path / "resumed"), dataset)
  assert checkpoint_lib.Checkpointer(str(tmp_path / "resumed"), tiny().checkpoint).all_steps() == [
    2
  ]
  train(tiny(), str(tmp_path / "resumed"), dataset)
  for a, b in zip(jax.tree.leaves(state("resumed")), jax.tree.leaves(state("eight"))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
