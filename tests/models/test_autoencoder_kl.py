"""autoencoder_kl (LDM's KL autoencoder) on tiny shapes: the contract, the reconstruction
capability, diffusers' names and parameter counts, the numbers of diffusers' AutoencoderKL on
the same random weights (fixture by tests/reference/autoencoder_kl_diffusers.py), bfloat16,
remat and scan, LDM's clamp and the one-line errors."""

import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxvae import defaults, models, settings
from flaxvae.errors import ConfigError, UsageError
from flaxvae.models import contract
from flaxvae.models.noise import NoiseSource
from flaxvae.objectives import bounds, likelihoods
from tests.reference import autoencoder_kl_diffusers as reference

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "autoencoder_kl_diffusers.npz"
LAPLACE = likelihoods.get_likelihood("laplace")
TINY = dict(channels=8, channel_multipliers=(1, 2), num_res_blocks=1, norm_groups=4)


def build(shape=(16, 16, 3), likelihood=LAPLACE, dtype=jnp.float32, abstract=False, **keys):
  return models.create_model(
    settings.resolve_model(defaults.model_config("autoencoder_kl", **{**TINY, **keys})),
    image_shape=shape,
    likelihood=likelihood,
    dtype=dtype,
    abstract=abstract,
  )


def images(shape=(16, 16, 3), n=3, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, *shape)).astype(np.float32) / 255.0


def noise(batch, k=1, seed=1):
  return NoiseSource.per_example(jax.random.split(jax.random.key(seed), batch), jnp.arange(k))


def run(model, method, *args):
  """model.method(*args) under jit (op by op, the convolutions are slow)."""
  graphdef, state = nnx.split(model)
  return jax.jit(lambda s: getattr(nnx.merge(graphdef, s), method)(*args))(state)


def pure_params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


# -- the contract and the reconstruction capability -------------------------------------------
def test_terms_follow_the_contract_with_a_convolutional_latent():
  model, x, k = build(shape=(14, 14, 1), pad_to=16), images((14, 14, 1)), 2
  assert model.latent_shapes == ((8, 8, 4),)
  assert set(contract.capabilities(model)) == {
    contract.LOCAL_POSTERIOR,
    contract.POSTERIOR_DENSITY,
    contract.RECONSTRUCTION,
  }  # not aggregate_posterior: ELBO surgery's mixture takes flat latents

  graphdef, state = nnx.split(model)
  on = lambda f: jax.jit(lambda s: f(nnx.merge(graphdef, s)))(state)

  def figures(model):  # one compile
    terms = model.terms(x, noise(len(x), k))
    zs = (terms.layers[0].z[0],)
    return terms, model.log_joint(x, zs) - model.log_posterior(x, zs), model.encode(x)

  terms, direct, (mean, logvar) = on(figures)
  (layer,) = terms.layers
  assert terms.log_px_z.shape == (k, 3) and layer.z.shape == (k, 3, 8, 8, 4)
  assert layer.kl.shape == layer.q_mean.shape == (k, 3, 256)
  np.testing.assert_allclose(bounds.log_weights(terms)[0], direct, rtol=1e-5, atol=1e-3)
  mean, logvar = np.float64(mean), np.float64(logvar)
  kl = 0.5 * np.sum(mean**2 + np.exp(logvar) - 1 - logvar, axis=(1, 2, 3))
  np.testing.assert_allclose(np.sum(layer.kl[0], -1), kl, rtol=1e-5)  # LDM's KL, summed
  shapes = jax.eval_shape(
    lambda: (
      model.decode(jnp.asarray(mean)),
      model.reconstruct(x, noise(3)),
      model.sample(jax.random.key(0), 2, 0.5),
    )
  )
  assert [a.shape for a in shapes] == [(3, 14, 14, 2)] * 2 + [(2, 14, 14, 2)]  # cropped


def test_reconstruct_for_training_and_its_output_layer():
  model, x = build(), images()
  out = run(model, "reconstruct_for_training", x, noise(3))
  assert isinstance(out, contract.Reconstruction)
  assert out.raw.shape == (3, 16, 16, 6) and out.features.shape == (3, 16, 16, 8)
  (layer,) = out.layers
  np.testing.assert_array_equal(out.raw, run(model, "decode", layer.z[0]))
  params = pure_params(model)
  conv_out = params
  for part in model.OUTPUT_LAYER:
    conv_out = conv_out[part]
  np.testing.assert_array_equal(out.raw, model.output_layer(conv_out, out.features))
  # The layer's own parameters are what a loss differentiates for LDM's adaptive weight.
  grad = jax.grad(lambda p: jnp.sum(jnp.abs(model.output_layer(p, out.features))))(conv_out)
  assert grad["kernel"].shape == conv_out["kernel"].shape and np.any(grad["kernel"] != 0)
  # The raw is LDM's: mean (out11 + 1) / 2 and log b = logvar - log 2 with logvar 0.
  np.testing.assert_allclose(out.raw[..., 1::2], -math.log(2.0))
  with pytest.raises(UsageError, match="one posterior sample"):
    model.reconstruct_for_training(x, noise(3, k=2))


def test_learned_logvar_is_a_top_level_group_and_gaussian_maps_a_variance():
  model = build(learn_logvar=True, logvar_init=0.5)
  assert set(pure_params(model)) == {
    "encoder",
    "decoder",
    "quant_conv",
    "post_quant_conv",
    "logvar",
  }
  conv_out, features = pure_params(model)["decoder"]["conv_out"], jnp.ones((3, 16, 16, 8))

  graphdef, state = nnx.split(model)

  def nll(state):  # the likelihood's scale is LDM's learned logvar
    raw = nnx.merge(graphdef, state).output_layer(conv_out, features)
    return -jnp.sum(LAPLACE.log_prob(raw, images()))

  assert float(jax.grad(nll)(state)["logvar"][...]) != 0.0
  assert "logvar" not in pure_params(build(use_quant_conv=False))
  assert set(pure_params(build(use_quant_conv=False))) == {"encoder", "decoder"}
  normal = build(likelihood=likelihoods.get_likelihood("gaussian"), logvar_init=1.0)
  conv_out = pure_params(normal)["decoder"]["conv_out"]
  raw = normal.output_layer(conv_out, jnp.zeros((1, 16, 16, 8)))
  np.testing.assert_allclose(raw[..., 1::2], 1.0 - 2 * math.log(2.0), rtol=1e-6)
  fixed = build(likelihood=likelihoods.get_likelihood("laplace", laplace_log_scale=-1.0))
  assert jax.eval_shape(fixed.decode, jnp.zeros((1, 8, 8, 4))).shape == (1, 16, 16, 3)


def test_parameters_only_and_the_abstract_build_has_the_real_ones_shapes():
  """Every array is a trained nnx.Param (a constant held as a Variable would be moved by the
  optimizer), and the build from shapes alone (jax's initializer, traced) has the structure,
  shapes and dtypes of the real one (numpy's draws)."""
  keys = dict(learn_logvar=True, attention_resolutions=(8,))
  real, abstract = nnx.state(build(**keys)), nnx.state(build(abstract=True, **keys))
  assert not jax.tree.leaves(nnx.state(build(**keys), nnx.Not(nnx.Param)))
  assert jax.tree.structure(real) == jax.tree.structure(abstract)
  signature = lambda tree: [(a.shape, a.dtype) for a in jax.tree.leaves(tree)]
  assert signature(real) == signature(abstract)
  # LeCun normal: standard deviation 1 / sqrt(fan-in), truncated at 2 / 0.88 of it.
  kernel = np.asarray(real["decoder"]["conv_in"]["kernel"][...])  # fan-in 3 x 3 x 4
  std = 1 / math.sqrt(36)
  assert np.abs(kernel).max() <= 2 * std / 0.8796 and 0.8 * std < kernel.std() < 1.2 * std


def test_logvar_is_clamped_as_ldm_clamps_it():
  model = build()
  bias = model.quant_conv.bias[...]
  for value, clamp in ((1e4, 20.0), (-1e4, -30.0)):
    model.quant_conv.bias[...] = bias.at[4:].set(value)
    _, logvar = run(model, "encode", images())
    np.testing.assert_array_equal(logvar, clamp)


# -- diffusers' names, counts and numbers ------------------------------------------------------
def diffusers_name(path):
  """Our pure-dict path -> diffusers' state-dict key (module docstring of autoencoder_kl)."""
  *modules, leaf = (str(p) for p in path)
  modules = [m if m != "to_out" else "to_out.0" for m in modules]
  return ".".join([*modules, {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)])


def from_torch_layout(path, array):
  """diffusers' array -> ours: conv weights OIHW -> HWIO, Linear weights transposed."""
  if path[-1] != "kernel":
    return array
  return array.T if array.ndim == 2 else array.transpose(2, 3, 1, 0)


def flat_params(model):
  return {
    diffusers_name(path): (path, leaf)
    for path, leaf in jax.tree_util.tree_flatten_with_path(pure_params(model))[0]
    for path in [tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)]
  }


def expand(modules):
  return {f"{m}.{leaf}" for m in modules for leaf in ("weight", "bias")}


def test_names_map_one_to_one_to_diffusers_keys_written_out_by_hand():
  """diffusers' AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1) state-dict keys."""
  resnet = lambda p, shortcut=False: [
    f"{p}.norm1",
    f"{p}.conv1",
    f"{p}.norm2",
    f"{p}.conv2",
    *([f"{p}.conv_shortcut"] if shortcut else []),
  ]
  attention = lambda p: [f"{p}.{n}" for n in ("group_norm", "to_q", "to_k", "to_v", "to_out.0")]
  mid = lambda p: [
    *resnet(f"{p}.mid_block.resnets.0"),
    *attention(f"{p}.mid_block.attentions.0"),
    *resnet(f"{p}.mid_block.resnets.1"),
  ]
  expected = expand(
    [
      "encoder.conv_in",
      *resnet("encoder.down_blocks.0.resnets.0"),
      "encoder.down_blocks.0.downsamplers.0.conv",
      *resnet("encoder.down_blocks.1.resnets.0", shortcut=True),
      *mid("encoder"),
      "encoder.conv_norm_out",
      "encoder.conv_out",
      "quant_conv",
      "post_quant_conv",
      "decoder.conv_in",
      *mid("decoder"),
      *resnet("decoder.up_blocks.0.resnets.0"),
      *resnet("decoder.up_blocks.0.resnets.1"),
      "decoder.up_blocks.0.upsamplers.0.conv",
      *resnet("decoder.up_blocks.1.resnets.0", shortcut=True),
      *resnet("decoder.up_blocks.1.resnets.1"),
      "decoder.conv_norm_out",
      "decoder.conv_out",
    ]
  )
  assert set(flat_params(build())) == expected


@pytest.mark.parametrize(
  "keys, count",
  [({}, 83_653_863), ({"latent_channels": 16, "use_quant_conv": False}, 83_819_683)],
)
def test_parameter_counts_of_the_sd_and_flux_layouts_are_diffusers(keys, count):
  """diffusers 0.42.1's AutoencoderKL: SD 1.x (block_out_channels 128, 256, 512, 512, 2 layers
  per block, 4 latent channels) and SD3/FLUX (16 latent channels, no quant convs), counting
  every tensor of the state dict, quant convs included."""
  model = build(
    shape=(256, 256, 3),
    abstract=True,
    channels=128,
    channel_multipliers=(1, 2, 4, 4),
    num_res_blocks=2,
    norm_groups=32,
    **keys,
  )
  assert sum(math.prod(a.shape) for a in jax.tree.leaves(nnx.state(model))) == count


@pytest.mark.parametrize(
  "layout, keys",
  [
    ("sd", {}),
    ("flux_attn8", {"latent_channels": 6, "use_quant_conv": False, "attention_resolutions": (8,)}),
  ],
)
def test_matches_diffusers_on_the_same_random_weights(layout, keys):
  fixture = np.load(FIXTURE)
  names = [str(k) for k in fixture[f"{layout}/keys"]]
  shapes = [tuple(int(d) for d in s.split(",")) for s in fixture[f"{layout}/shapes"]]
  state = reference.random_state(names, shapes)
  model = build(**keys)
  ours = flat_params(model)
  assert sorted(ours) == sorted(names)  # one to one, both ways
  for name, (path, leaf) in ours.items():
    value = from_torch_layout(path, state[name].astype(np.float32))
    assert value.shape == leaf.shape, name
    variable = model
    for part in path:
      variable = variable[part] if isinstance(part, int) else getattr(variable, part)
    variable[...] = jnp.asarray(value)
  x01 = (np.transpose(fixture[f"{layout}/x11"], (0, 2, 3, 1)) + 1.0) / 2.0
  nchw = lambda a: np.transpose(np.asarray(a, np.float64), (0, 3, 1, 2))
  with jax.default_matmul_precision("highest"):
    mean, logvar = run(model, "encode", jnp.asarray(x01, jnp.float32))
    raw = run(model, "decode", mean)
  tol = dict(rtol=1e-5, atol=2e-5)  # float32 against float64
  np.testing.assert_allclose(nchw(mean), fixture[f"{layout}/mean"], **tol)
  np.testing.assert_allclose(nchw(logvar), fixture[f"{layout}/logvar"], **tol)
  out11 = 2.0 * nchw(raw[..., 0::2]) - 1.0  # the mean (out11 + 1) / 2 back to diffusers' out
  np.testing.assert_allclose(out11, fixture[f"{layout}/decoded"], **tol)


# -- accelerators: bfloat16, remat, scan -------------------------------------------------------
def test_bfloat16_computes_in_bfloat16_with_float32_parameters():
  x = images()
  half, full = build(dtype=jnp.bfloat16), build()
  assert {a.dtype for a in jax.tree.leaves(nnx.state(half))} == {jnp.dtype(jnp.float32)}
  terms = run(half, "terms", x, noise(3))
  assert terms.log_px_z.dtype == jnp.float32 and terms.layers[0].kl.dtype == jnp.float32
  np.testing.assert_allclose(terms.log_px_z, run(full, "terms", x, noise(3)).log_px_z, rtol=0.05)


@pytest.mark.parametrize(
  "model_keys",
  [
    {"remat": True, "scan_blocks": True},
    pytest.param({"remat": True}, marks=pytest.mark.slow),
    pytest.param({"scan_blocks": True}, marks=pytest.mark.slow),
  ],
)
def test_remat_and_scan_give_the_plain_numbers(model_keys):
  """The same loss and gradients with identical blocks scanned over and recomputed: two
  blocks per encoder level and three per decoder level, attention at 8x8 too."""
  keys = dict(num_res_blocks=2, attention_resolutions=(8,))
  x, state = images(n=2), nnx.state(build(**keys))

  def loss_and_grad(model_keys):
    graphdef = nnx.graphdef(build(**keys, **model_keys))
    loss = lambda s: -jnp.sum(nnx.merge(graphdef, s).terms(x, noise(2)).log_px_z)
    return jax.jit(jax.value_and_grad(loss))(state), str(jax.make_jaxpr(loss)(state))

  (want, want_grad), plain = loss_and_grad({})
  (got, grad), jaxpr = loss_and_grad(model_keys)
  assert ("scan" in jaxpr) == model_keys.get("scan_blocks", False) and "scan" not in plain
  assert ("remat" in jaxpr) == model_keys.get("remat", False) and "remat" not in plain
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(want_grad)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


# -- one-line errors ---------------------------------------------------------------------------
@pytest.mark.parametrize(
  "shape, keys, words",
  [
    ((30, 30, 3), {"channel_multipliers": (1, 2, 2)}, "downsamples by 4"),
    ((16, 16, 3), {"norm_groups": 3}, "norm_groups 3 must divide"),
    ((16, 16, 3), {"dropout": 0.1}, "dropout"),
    ((16, 16, 3), {"latent_channels": 0}, "must be positive"),
  ],
)
def test_bad_settings_are_one_line_config_errors(shape, keys, words):
  with pytest.raises(ConfigError, match=words) as info:
    build(shape=shape, **keys)
  assert "\n" not in str(info.value)
  with pytest.raises(ConfigError, match="learn_logvar") as info:
    build(likelihood=likelihoods.get_likelihood("bernoulli"), learn_logvar=True)
  assert "\n" not in str(info.value)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_upsample_by_phases_is_nearest_upsampling_then_a_same_conv(dtype):
  """Upsample's four low-resolution 2x2 convolutions against the definition in float32 (repeat
  each pixel 2x2, then the 3x3 'same' conv with the same parameters): values and gradients,
  odd sizes; bfloat16 within 5% of each output's largest magnitude (its bias gradient sums
  in bfloat16)."""
  from flaxvae.models import autoencoder_kl

  layer = autoencoder_kl.Upsample(8, nnx.Rngs(0), dtype)
  layer.conv.bias[...] = jax.random.normal(jax.random.key(1), (8,))
  graphdef, params = nnx.split(layer)
  definition_graphdef = nnx.graphdef(autoencoder_kl.Upsample(8, nnx.Rngs(0), jnp.float32))
  x = jax.random.normal(jax.random.key(2), (2, 5, 3, 8))

  def definition(params, x):
    upsampled = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return nnx.merge(definition_graphdef, params).conv(upsampled)

  def by_phases(params, x):
    return nnx.merge(graphdef, params)(x).astype(jnp.float32)

  loss = lambda f: lambda p, x: jnp.sum(jnp.sin(f(p, x)))
  ours = [by_phases(params, x), *jax.tree.leaves(jax.grad(loss(by_phases), (0, 1))(params, x))]
  exact = [definition(params, x), *jax.tree.leaves(jax.grad(loss(definition), (0, 1))(params, x))]
  for a, b in zip(ours, exact, strict=True):
    scale = 5e-2 * float(jnp.abs(b).max()) if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=scale)
