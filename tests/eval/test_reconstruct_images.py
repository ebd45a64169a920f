"""`flaxvae reconstruct` (flaxvae/eval/reconstruct_images.py): reading the user's images, whole
against tiled reconstructions at a size the model was not trained at, and one-line errors."""

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from flaxvae.errors import ConfigError
from flaxvae.eval import reconstruct_images
from tests.eval.test_latent_stats import run  # noqa: F401  (the tiny autoencoder's run)


def test_images_are_read_from_pictures_arrays_and_folders(tmp_path):
  Image.fromarray(np.full((8, 12), 7, np.uint8)).save(tmp_path / "grey.png")
  np.save(tmp_path / "batch.npy", np.zeros((2, 4, 4, 3), np.uint8))
  found = dict(reconstruct_images.read_images(str(tmp_path)))
  assert sorted(found) == ["batch_0", "batch_1", "grey"]
  assert found["grey"].shape == (8, 12, 1) and found["batch_1"].shape == (4, 4, 3)


@pytest.mark.parametrize(
  "make, message",
  [
    (lambda p: p / "missing", "no such file or folder"),
    (lambda p: p, "no .png, .jpg or .npy files"),
    (lambda p: np.save(p / "f.npy", np.zeros((4, 4), np.float32)) or p / "f.npy", "must be uint8"),
  ],
)
def test_unreadable_images_fail_in_one_line(tmp_path, make, message):
  with pytest.raises(ConfigError, match=message) as error:
    reconstruct_images.read_images(str(make(tmp_path)))
  assert "\n" not in str(error.value)


def test_one_tile_is_the_whole_image_and_tiles_cover_a_larger_one(run):  # noqa: F811
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(1, 48, 64, 1)), jnp.float32)
  whole = reconstruct_images.reconstruct_fn(run, (48, 64, 1), 0, 0)(run.params, x)
  single = reconstruct_images.reconstruct_fn(run, (48, 48, 1), 64, 16)(run.params, x[:, :, :48])
  tiled = reconstruct_images.reconstruct_fn(run, (48, 64, 1), 32, 16)(run.params, x)
  assert whole.shape == tiled.shape == (1, 48, 64, 1)
  np.testing.assert_array_equal(
    single, reconstruct_images.reconstruct_fn(run, (48, 48, 1), 0, 0)(run.params, x[:, :, :48])
  )
  assert (
    np.isfinite(np.asarray(tiled)).all() and 0.0 <= float(tiled.min()) <= float(tiled.max()) <= 1.0
  )
  with pytest.raises(ConfigError, match="multiples of 2"):
    reconstruct_images.reconstruct_fn(run, (48, 64, 1), 31, 0)
