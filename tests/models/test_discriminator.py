"""The PatchGAN discriminator: taming's layout and size, BatchNorm over the global batch on a mesh,
the pure `discriminate`, and parity with a PyTorch NLayerDiscriminator on the same weights."""

import functools
import pathlib
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxvae.errors import ConfigError
from flaxvae.models import discriminator as disc
from flaxvae.objectives import adversarial

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "discriminator.npz"
EXPLICIT = jax.sharding.AxisType.Explicit


def settings(norm="batch", num_layers=3, width=8):
  return SimpleNamespace(num_layers=num_layers, width=width, norm=norm, loss="hinge")


def images(n=16, side=32, channels=3, seed=0):
  return jax.random.uniform(jax.random.key(seed), (n, side, side, channels), minval=-1, maxval=1)


def abstract(s, channels=3, **kwargs):
  return nnx.eval_shape(lambda: disc.create_discriminator(s, channels, 0, **kwargs))


def random_params(s, channels=3, seed=0, **kwargs):
  """(graphdef, params, stats) with weights drawn by numpy: no initialiser to compile. Norm
  scales near 1, other weights N(0, 0.1), running statistics (0, 1) as created."""
  graphdef, params, stats = disc.split_discriminator(abstract(s, channels, **kwargs))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    noise = rng.normal(0, 0.1, leaf.shape).astype(np.float32)
    return noise + 1 if path[-1].key == "scale" else noise

  return graphdef, jax.tree_util.tree_map_with_path(draw, params), initial_stats(stats)


def initial_stats(abstract_stats):
  """BatchNorm's running statistics as created (mean 0, variance 1) for abstract ones."""
  return jax.tree_util.tree_map_with_path(
    lambda path, leaf: np.full(leaf.shape, float(path[-1].key == "var"), np.float32),
    abstract_stats,
  )


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_ldm_discriminator_size_and_logit_map():
  """taming's default (3 layers, width 64, BatchNorm, RGB): 2,765,633 parameters as PyTorch
  counts them (running statistics are buffers), and a 30x30 map for 256x256 images."""
  graphdef, params, stats = disc.split_discriminator(abstract(settings("batch", 3, 64)))
  assert count(params) == 2_765_633
  assert count(stats) == 2 * (128 + 256 + 512)
  logits, new_stats = jax.eval_shape(
    lambda p, s, x: disc.discriminate(graphdef, p, s, x),
    params,
    stats,
    jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32),
  )
  assert (logits.shape, logits.dtype) == ((2, 30, 30, 1), jnp.float32)
  assert jax.tree.map(lambda a: a.shape, new_stats) == jax.tree.map(lambda a: a.shape, stats)
  assert disc.logit_side(256, 3) == 30 and disc.logit_side(32, 3) == 2


def test_layout_per_norm():
  for norm in disc.NORMS:
    model = abstract(settings(norm, 2, 4), 1)
    graphdef, params, stats = disc.split_discriminator(model)
    assert [b.conv.kernel.shape for b in model.blocks] == [
      (4, 4, 1, 4),
      (4, 4, 4, 8),
      (4, 4, 8, 16),
    ]
    assert model.conv_out.kernel.shape == (4, 4, 16, 1)
    biased = [b.conv.bias is not None for b in model.blocks]
    assert biased == [True, norm == "none", norm == "none"]
    assert (stats != {}) == (norm == "batch")
    logits, new_stats = jax.eval_shape(
      functools.partial(disc.discriminate, graphdef),
      params,
      stats,
      jax.ShapeDtypeStruct((2, 16, 16, 1), jnp.float32),
    )
    assert logits.shape == (2, 2, 2, 1) and (new_stats == {}) == (norm != "batch")


def test_group_count_is_32_or_the_largest_divisor_below():
  assert [disc.group_count(c) for c in (512, 64, 32, 24, 16, 8, 3)] == [32, 32, 32, 24, 16, 8, 3]
  assert disc.group_count(48) == 24


def test_initialisation_follows_taming():
  model = disc.create_discriminator(settings("batch", 2, 8), 3, 0)
  kernel = np.asarray(model.blocks[2].conv.kernel[...])  # 4*4*16*32 draws
  assert abs(kernel.mean()) < 1e-3 and abs(kernel.std() - 0.02) < 2e-3
  scale = np.concatenate([np.asarray(b.norm.scale[...]) for b in model.blocks[1:]])
  assert abs(scale.mean() - 1) < 0.01 and 0.01 < scale.std() < 0.03
  assert all(np.all(np.asarray(b.norm.bias[...]) == 0) for b in model.blocks[1:])
  bound = 1 / np.sqrt(3 * 16)  # PyTorch's default conv bias, U(-1/sqrt(fan_in), 1/sqrt(fan_in))
  bias = np.asarray(model.blocks[0].conv.bias[...])
  assert np.all(np.abs(bias) <= bound) and bias.std() > bound / 4


def test_bad_settings_are_one_line():
  with pytest.raises(ConfigError, match=r"unknown adversary.norm 'layer': use one of batch"):
    disc.create_discriminator(settings("layer"), 3, 0)
  with pytest.raises(ConfigError, match="must be positive"):
    disc.create_discriminator(settings(num_layers=0), 3, 0)
  with pytest.raises(ConfigError, match="lower adversary.num_layers"):
    disc.check_image_size(settings(num_layers=3), 16, 16)
  disc.check_image_size(settings(num_layers=3), 28, 28)  # a 1x1 map is fine


def test_train_mode_moves_running_stats_and_eval_mode_uses_them():
  graphdef, params, stats = random_params(settings())
  x = images(4)
  fn = jax.jit(disc.discriminate, static_argnums=(0, 4))
  logits, new_stats = fn(graphdef, params, stats, x, True)
  # one update from (0, 1): 0.1 * the batch mean, 0.9 + 0.1 * the unbiased batch variance
  model = nnx.merge(graphdef, params, stats)
  h = x
  for block in model.blocks[:1]:
    h = block(h, True)
  conv = np.asarray(model.blocks[1].conv(h), np.float64).reshape(-1, 16)
  want_mean, want_var = 0.1 * conv.mean(0), 0.9 + 0.1 * conv.var(0, ddof=1)
  np.testing.assert_allclose(new_stats["blocks"][1]["norm"]["mean"], want_mean, atol=1e-6)
  np.testing.assert_allclose(new_stats["blocks"][1]["norm"]["var"], want_var, rtol=1e-5)
  eval_logits, same = fn(graphdef, params, new_stats, x, False)
  jax.tree.map(np.testing.assert_array_equal, same, new_stats)
  assert not np.allclose(eval_logits, logits)  # running statistics are not the batch's


@pytest.mark.parametrize("mesh_shape", [(8,), (4, 2)])
def test_batchnorm_over_the_mesh_equals_one_device_on_the_whole_batch(mesh_shape):
  names = ("data", "fsdp")[: len(mesh_shape)]
  axis_name = names if len(names) > 1 else names[0]
  mesh = jax.make_mesh(mesh_shape, names, axis_types=(EXPLICIT,) * len(names))
  graphdef, params, stats = random_params(settings(), axis_name=axis_name)
  one_graphdef, *_ = disc.split_discriminator(abstract(settings()))
  x = images(16)

  def per_device(params, stats, x):
    return disc.discriminate(graphdef, params, stats, x)

  batch = jax.P(names)
  fn = jax.jit(
    jax.shard_map(
      per_device,
      mesh=mesh,
      in_specs=(jax.P(), jax.P(), batch),
      out_specs=(batch, jax.P()),
      check_vma=False,
    )
  )
  logits, new_stats = fn(params, stats, jax.device_put(x, jax.NamedSharding(mesh, batch)))
  want_logits, want_stats = jax.jit(disc.discriminate, static_argnums=0)(
    one_graphdef, params, stats, x
  )
  np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new_stats, want_stats
  )
  # ... and not what each device would get from its own 2 images
  local, _ = jax.jit(disc.discriminate, static_argnums=0)(one_graphdef, params, stats, x[:2])
  assert not np.allclose(local, want_logits[:2], atol=1e-3)


def load_fixture():
  if not FIXTURE.exists():
    pytest.skip(f"{FIXTURE} missing: run tests/reference/discriminator_reference.py")
  return dict(np.load(FIXTURE))


def fixture_params(model, fixture, norm):
  """The fixture's PyTorch weights (OIHW) in this model's pure param dict (HWIO)."""
  _, params, stats = disc.split_discriminator(model)
  kernel = lambda i: np.transpose(fixture[f"conv{i}.weight"], (2, 3, 1, 0))
  for i, block in sorted(params["blocks"].items()):
    block["conv"]["kernel"] = kernel(i)
    if "bias" in block["conv"]:
      block["conv"]["bias"] = fixture[f"conv{i}.bias.{norm}"]
    if "norm" in block:
      affine = block["norm"]["norm"] if norm == "group" else block["norm"]
      affine["scale"], affine["bias"] = fixture[f"norm{i}.weight"], fixture[f"norm{i}.bias"]
  last = len(params["blocks"])
  params["conv_out"] = {"kernel": kernel(last), "bias": fixture[f"conv{last}.bias.{norm}"]}
  return params, initial_stats(stats)


@pytest.mark.parametrize("norm", disc.NORMS)
def test_matches_pytorch_on_the_same_weights(norm):
  """Logits (and BatchNorm's running statistics after one train-mode call, and its eval-mode
  logits) of tests/reference/discriminator_reference.py's PyTorch NLayerDiscriminator."""
  fixture = load_fixture()
  x = np.transpose(fixture["images"], (0, 2, 3, 1))
  width, num_layers = int(fixture["width"]), int(fixture["num_layers"])
  model = abstract(settings(norm, num_layers, width), x.shape[-1])
  graphdef, *_ = disc.split_discriminator(model)
  params, stats = fixture_params(model, fixture, norm)
  with jax.default_matmul_precision("highest"):
    logits, new_stats = disc.discriminate(graphdef, params, stats, x, train=True)
  want = np.transpose(fixture[f"logits.{norm}"], (0, 2, 3, 1))
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
  if norm != "batch":
    return
  for i, block in new_stats["blocks"].items():
    np.testing.assert_allclose(block["norm"]["mean"], fixture[f"norm{i}.running_mean"], 1e-5, 1e-6)
    np.testing.assert_allclose(block["norm"]["var"], fixture[f"norm{i}.running_var"], 1e-5, 1e-6)
  with jax.default_matmul_precision("highest"):
    eval_logits, _ = disc.discriminate(graphdef, params, new_stats, x, train=False)
  want = np.transpose(fixture["logits.batch.eval"], (0, 2, 3, 1))
  np.testing.assert_allclose(eval_logits, want, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_and_gradients_for_both_players():
  """bfloat16 compute gives float32 logits; the step differentiates `discriminate` with respect
  to the parameters (the discriminator's loss) and the images (the generator's loss, R1)."""
  graphdef, params, stats = random_params(settings(), dtype=jnp.bfloat16)
  x = images(4)

  def losses(params, x):
    logits, new_stats = disc.discriminate(graphdef, params, stats, x)
    r1 = adversarial.r1_penalty(lambda y: disc.discriminate(graphdef, params, stats, y)[0], x)
    return adversarial.discriminator_loss("hinge", logits, -logits) + r1, (logits, new_stats)

  grads, (logits, new_stats) = jax.jit(jax.grad(losses, argnums=(0, 1), has_aux=True))(params, x)
  assert logits.dtype == jnp.float32 and logits.shape == (4, 2, 2, 1)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(new_stats))
  leaves = jax.tree.leaves(grads)
  assert all(np.all(np.isfinite(g)) for g in leaves) and all(np.any(g != 0) for g in leaves)
  # the caller's (numpy) statistics are left as they were: new ones come back
  for block in stats["blocks"].values():
    assert np.all(block["norm"]["mean"] == 0) and np.all(block["norm"]["var"] == 1)
