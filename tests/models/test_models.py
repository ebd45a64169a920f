"""The model contract, checked against direct computation on tiny instances: shapes, per-layer
terms that add up to the ELBO and the importance weights, an IAF that starts as the Gaussian,
a two-layer model's ELBO computed by hand, and a checkpoint of flaxvae 0.1 that still loads."""

import math
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flaxvae
from flaxvae import api, data, defaults, models, settings
from flaxvae.errors import ConfigError, ModelContractError
from flaxvae.models import contract, layers
from flaxvae.models.ladder import LadderMLPVAE
from flaxvae.models.noise import NoiseSource
from flaxvae.objectives import bounds, gaussian, likelihoods
from flaxvae.run import Run

SHAPE = (8, 8, 1)
BERNOULLI = likelihoods.get_likelihood("bernoulli")
FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"


def build(name, seed=0, likelihood=BERNOULLI, abstract=False, **keys):
  return models.create_model(
    settings.resolve_model(defaults.model_config(name, **keys)),
    image_shape=SHAPE,
    likelihood=likelihood,
    seed=seed,
    abstract=abstract,
  )


def binary_images(n=5, seed=0):
  return (np.random.default_rng(seed).random((n, *SHAPE)) < 0.4).astype(np.float32)


def noise(batch, k, seed=1):
  return NoiseSource.per_example(jax.random.split(jax.random.key(seed), batch), jnp.arange(k))


MODELS = [
  ("mlp", dict(hidden=(16,), latent_dim=3)),
  ("mlp", dict(hidden=(16,), latent_dim=3, posterior="iaf", iaf_hidden=8, iaf_context=4)),
  ("conv", dict(latent_dim=3, channels=(4, 4))),
  ("ladder_mlp", dict(hidden=((16,), (8,)), latent_dims=(4, 2))),
  (
    "vdvae",
    dict(
      dec_layers="1:1,4:2,8:1",
      enc_blocks="8:1,4:1,1:1",
      widths="8",
      bottleneck=0.5,
      latent_channels=2,
      pad_to=8,
    ),
  ),
]


def jitted(model, method, *args, **static):
  """model.method(*args) under jit (deep models run op by op, slowly, without it)."""
  graphdef, state = nnx.split(model)
  return jax.jit(lambda s: getattr(nnx.merge(graphdef, s), method)(*args, **static))(state)


@pytest.mark.parametrize("name, keys", MODELS)
def test_terms_shapes_and_the_elbo_adds_up_over_layers(name, keys):
  model, x, k = build(name, **keys), binary_images(), 3
  terms = jitted(model, "terms", x, noise(len(x), k))
  assert terms.log_px_z.shape == (k, len(x)) and len(terms.layers) == len(model.latent_shapes)
  for layer, shape in zip(terms.layers, model.latent_shapes):
    units = math.prod(shape)
    assert layer.z.shape == (k, len(x), *shape)
    assert layer.log_q.shape == layer.log_p.shape == (k, len(x))
    assert layer.kl.shape == layer.q_mean.shape[:2] + (units,) == (k, len(x), units)
  values = bounds.per_example(terms)
  by_hand = jnp.mean(terms.log_px_z, 0) - sum(jnp.mean(jnp.sum(l.kl, -1), 0) for l in terms.layers)
  np.testing.assert_allclose(values["elbo"], by_hand, rtol=1e-5)
  np.testing.assert_allclose(values["rate"], jnp.sum(values["rate_by_layer"], -1), rtol=1e-5)
  # The importance weights are log p(x, z) - log q(z | x) at the sampled latents.
  if contract.has(model, contract.POSTERIOR_DENSITY):
    zs = tuple(l.z[0] for l in terms.layers)
    direct = jitted(model, "log_joint", x, zs) - jitted(model, "log_posterior", x, zs)
    np.testing.assert_allclose(bounds.log_weights(terms)[0], direct, rtol=1e-4, atol=1e-3)
  raw = jitted(model, "sample", jax.random.key(0), 4, 0.5)
  assert raw.shape == (4, *SHAPE[:2], BERNOULLI.channels_out(SHAPE[2]))
  recon = jitted(model, "reconstruct", x, noise(len(x), 1), keep_layers=0)
  assert recon.shape == (len(x), *raw.shape[1:])


@pytest.mark.parametrize("name, keys", MODELS)
def test_every_array_a_model_holds_is_a_trained_parameter(name, keys):
  """The trainer optimises the whole state nnx.split gives it: a constant held as a Variable
  (the IAF's MADE masks were) would be moved by the optimizer."""
  assert not jax.tree.leaves(nnx.state(build(name, **keys), nnx.Not(nnx.Param)))


@pytest.mark.parametrize("name, keys", MODELS)
def test_a_model_built_from_shapes_alone_has_the_real_ones_structure(name, keys):
  """Ahead-of-time compiles build the model from shapes alone, where VDVAE repeats one layer's
  shapes instead of tracing each layer: the tree must be the real model's."""
  real = nnx.state(build(name, **keys))
  abstract = nnx.state(build(name, abstract=True, **keys))
  assert all(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(abstract))
  assert jax.tree.structure(real) == jax.tree.structure(abstract)
  assert jax.tree.leaves(jax.tree.map(lambda a: (a.shape, a.dtype), real)) == jax.tree.leaves(
    jax.tree.map(lambda a: (a.shape, a.dtype), abstract)
  )


def test_a_trained_iaf_stays_a_density_its_log_det_is_the_sum_of_log_sigmas():
  """Every array of the model's state moved (as training moves it), the flow is still
  autoregressive: log |det dz_T/dz_0| equals the sum of log sigma that log q(z|x) uses."""
  iaf = build(
    "mlp", hidden=(16,), latent_dim=5, posterior="iaf", iaf_steps=2, iaf_hidden=8, iaf_context=4
  )
  graphdef, state = nnx.split(iaf)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  moved = jax.tree.unflatten(
    tree, [a + 0.5 * jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys)]
  )
  flow = nnx.merge(graphdef, moved).flow
  z0, context = (
    jax.random.normal(jax.random.key(4), (5,)),
    jax.random.normal(jax.random.key(5), (4,)),
  )
  jacobian = jax.jacfwd(lambda z: flow(z[None], context[None])[0][0])(z0)
  log_sigma = flow(z0[None], context[None])[1][0]
  np.testing.assert_allclose(
    np.linalg.slogdet(np.asarray(jacobian, np.float64))[1],
    float(jnp.sum(log_sigma)),
    rtol=1e-4,
    atol=1e-4,
  )


def test_an_untrained_iaf_posterior_is_the_gaussian():
  """Zero-initialised last layers make every flow step the identity with log sigma = 0."""
  iaf = build(
    "mlp", hidden=(16,), latent_dim=3, posterior="iaf", iaf_steps=2, iaf_hidden=8, iaf_context=4
  )
  gaussian = build("mlp", hidden=(16,), latent_dim=3)
  shared = {
    k: v
    for k, v in nnx.to_pure_dict(nnx.state(iaf)).items()
    if k in ("encoder", "to_mean", "to_logvar", "decoder", "to_output")
  }
  nnx.update(gaussian, shared)
  x = binary_images()
  a, b = iaf.terms(x, noise(len(x), 4)), gaussian.terms(x, noise(len(x), 4))
  for field in ("z", "log_q", "log_p"):
    np.testing.assert_allclose(
      getattr(a.layers[0], field), getattr(b.layers[0], field), rtol=1e-6, atol=1e-6
    )
  np.testing.assert_allclose(a.log_px_z, b.log_px_z, rtol=1e-6)
  np.testing.assert_allclose(bounds.log_weights(a), bounds.log_weights(b), rtol=1e-6)
  assert not iaf.analytic_kl and contract.has(iaf, contract.LOCAL_POSTERIOR)
  assert not contract.has(iaf, contract.AGGREGATE_POSTERIOR)


def _mlp(layers, h, activation=np.tanh, last_linear=True):
  for i, layer in enumerate(layers):
    h = h @ np.asarray(layer["kernel"], np.float64) + np.asarray(layer["bias"], np.float64)
    if not (last_linear and i == len(layers) - 1):
      h = activation(h)
  return h


def _log_normal(z, mean, logvar):
  return np.sum(-0.5 * (np.log(2 * np.pi) + logvar + (z - mean) ** 2 / np.exp(logvar)), -1)


def test_a_two_layer_elbo_equals_its_terms_computed_by_hand():
  model = build("ladder_mlp", hidden=((6,), (5,)), latent_dims=(4, 2))
  p = nnx.to_pure_dict(nnx.state(model))
  x = binary_images(3)
  n = noise(3, 1)
  terms = model.terms(x, n)
  eps2, eps1 = (
    np.asarray(n.normal(layer, (d,))[0], np.float64) for layer, d in ((0, 2), (1, 4))
  )  # layer 0 is the top (z2)
  head = lambda q, h: (_mlp(q["body"]["layers"].values(), h, last_linear=False),)[0]
  gauss = lambda q, h: (_mlp([q["to_mean"]], head(q, h)), _mlp([q["to_logvar"]], head(q, h)))
  flat = x.reshape(3, -1).astype(np.float64)
  m1, lv1 = gauss(p["inference"][0], flat)
  z1 = m1 + np.exp(0.5 * lv1) * eps1
  m2, lv2 = gauss(p["inference"][1], z1)
  z2 = m2 + np.exp(0.5 * lv2) * eps2
  pm1, plv1 = gauss(p["generative"][0], z2)
  logits = _mlp([*p["to_x"]["layers"].values(), p["to_output"]], z1)
  log_px = np.sum(flat * logits - np.logaddexp(0, logits), -1)
  log_w = (
    log_px
    + _log_normal(z1, pm1, plv1)
    + _log_normal(z2, 0, 0)
    - _log_normal(z1, m1, lv1)
    - _log_normal(z2, m2, lv2)
  )
  np.testing.assert_allclose(bounds.log_weights(terms)[0], log_w, rtol=1e-5, atol=1e-4)
  kl_top = 0.5 * np.sum(np.exp(lv2) + m2**2 - 1 - lv2, -1)  # analytic given z1
  elbo = log_px - kl_top - (_log_normal(z1, m1, lv1) - _log_normal(z1, pm1, plv1))
  values = bounds.per_example(terms)
  np.testing.assert_allclose(values["elbo"], elbo, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(values["rate_by_layer"][:, 0], kl_top, rtol=1e-5, atol=1e-5)


def test_a_checkpoint_of_flaxvae_0_1_loads_with_its_numbers(tmp_path):
  """Written by flaxvae 0.1 (784-16-2 MLP, step 20); the figures were computed with 0.1."""
  shutil.copytree(FIXTURES / "v0_1_mlp", tmp_path / "run")
  model = flaxvae.load(str(tmp_path / "run"))
  assert model.step == 20 and model.config.flaxvae_version == "0.1.0"
  assert model.config.data.protocol == "grey"  # data.binarization "none", renamed
  x = (np.arange(5 * 28 * 28).reshape(5, 28, 28, 1) % 256).astype(np.float32) / 255.0
  mean, logvar = model.encode(x)
  np.testing.assert_allclose(
    mean,
    [
      [-0.13502434, 0.01550101],
      [-0.13557357, 0.13647895],
      [-0.11067373, -0.09518293],
      [-0.05217928, -0.229108],
      [-0.00347012, -0.31665072],
    ],
    rtol=1e-5,
    atol=1e-6,
  )
  np.testing.assert_allclose(
    logvar[:, 0], [-4.641462, -4.5451007, -4.5897098, -4.37917, -4.389903], rtol=1e-5
  )
  np.testing.assert_allclose(
    model.log_likelihood(x, mean),
    [-543.4937, -543.7315, -543.32965, -544.85925, -547.41425],
    rtol=1e-5,
  )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_pointwise_conv_is_nnx_conv_in_parameters_values_and_gradients(dtype):
  fast = layers.conv(6, 4, nnx.Rngs(0), dtype, kernel=1)
  plain = nnx.Conv(6, 4, (1, 1), dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  assert isinstance(fast, layers.PointwiseConv)
  assert jax.tree.structure(nnx.state(fast)) == jax.tree.structure(nnx.state(plain))
  for module in (fast, plain):
    module.bias[...] = jnp.arange(4.0) / 10
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 5, 6))

  def outputs(module):
    graphdef, state = nnx.split(module)
    f = lambda state, x: jnp.sum(jnp.sin(nnx.merge(graphdef, state)(x).astype(jnp.float32)))
    return nnx.merge(graphdef, state)(x), jax.grad(f, argnums=(0, 1))(state, x)

  (y_fast, g_fast), (y_plain, g_plain) = outputs(fast), outputs(plain)
  assert y_fast.dtype == y_plain.dtype == dtype
  tol = 1e-5 if dtype == jnp.float32 else 3e-2
  np.testing.assert_allclose(np.float32(y_fast), np.float32(y_plain), atol=tol, rtol=tol)
  for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_plain)):
    np.testing.assert_allclose(np.float32(a), np.float32(b), atol=tol, rtol=tol)


# -- the contract, enforced where a model registers -------------------------------------------
def test_the_model_registry_enforces_the_contract_on_every_shipped_model():
  """Registration is what checks the contract: the registry must run check_model_class (a
  registry without it would let every shipped model through unchecked), and each shipped
  model passes it when checked again."""
  assert models.MODELS.check is contract.check_model_class
  assert models.MODELS.names(), "no model registered"
  for name, cls in models.MODELS.items():
    assert contract.check_model_class(name, cls) is cls
    assert set(contract.capabilities(cls)) <= set(contract.CAPABILITY_PROTOCOLS)


class _Incomplete(nnx.Module):
  """Gives `terms` and nothing else of the contract."""

  def terms(self, x, noise):
    return None


@pytest.mark.parametrize(
  "make, missing",
  [
    (lambda: _Incomplete, "lacks latent_shapes, log_joint, log_prior, prior_sample, generate"),
    (lambda: type("NoPrior", (LadderMLPVAE,), {"log_prior": None}), "lacks log_prior"),
    (
      lambda: type("Claims", (LadderMLPVAE,), {"CAPABILITIES": (contract.LOCAL_POSTERIOR,)}),
      "declares the local_posterior capability but lacks encode_local, terms_given",
    ),
    (
      lambda: type("Typo", (LadderMLPVAE,), {"CAPABILITIES": ("posterior_densty",)}),
      "unknown capabilities ['posterior_densty']",
    ),
  ],
)
def test_a_model_that_breaks_the_contract_fails_when_it_registers_in_one_line(make, missing):
  with pytest.raises(ModelContractError) as failure:
    models.MODELS.register("incomplete")(make())
  assert missing in str(failure.value) and "\n" not in str(failure.value)
  assert "incomplete" not in models.MODELS


# -- flaxvae.Model.log_prior is the model's own prior ------------------------------------------
def _api_model(name, keys, seed=7):
  """flaxvae.Model of a fresh `name` model whose parameters are all moved (as training moves
  them: VDVAE's prior starts as N(0, I))."""
  config = defaults.base_config()
  config.model = defaults.model_config(name, **keys)
  config.data.protocol = "binarized"
  images = (np.random.default_rng(0).random((8, *SHAPE)) * 255).astype(np.uint8)
  run = Run(
    config, data.ArrayDataset({"train": images, "test": images}, name="random"), for_training=False
  )
  leaves, tree = jax.tree.flatten(run.params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  moved = jax.tree.unflatten(
    tree, [a + 0.3 * jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys)]
  )
  return api.Model(run, moved, 0)


@pytest.mark.parametrize("name, keys", MODELS)
def test_the_api_log_prior_is_the_models_own_prior(name, keys):
  """log p(z) = log p(x, z) - log p(x | z), and the sum of the layers' log p in the terms at
  the same latents; on hierarchical models it is not the N(0, I) density."""
  api_model, x = _api_model(name, keys), binary_images()
  model = api_model.run.model_with(api_model.params)
  terms = jitted(model, "terms", x, noise(len(x), 1))
  zs = tuple(layer.z[0] for layer in terms.layers)
  log_prior = api_model.log_prior(zs)
  log_px_z = api_model.likelihood.log_prob(jitted(model, "generate", zs), x)
  np.testing.assert_allclose(log_prior, api_model.log_joint(x, zs) - log_px_z, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(
    log_prior, sum(layer.log_p[0] for layer in terms.layers), rtol=1e-4, atol=1e-3
  )
  standard = sum(gaussian.log_standard_normal(z.reshape(len(x), -1)) for z in zs)
  if len(zs) == 1:  # one layer: N(0, I), and the latent alone is enough
    np.testing.assert_allclose(api_model.log_prior(zs[0]), standard, rtol=1e-5)
  else:
    assert np.min(np.abs(log_prior - standard)) > 0.1
    with pytest.raises(ConfigError, match="takes latents of shapes"):
      api_model.log_prior(zs[0])
