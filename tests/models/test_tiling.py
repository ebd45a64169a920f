"""Tiled encoding and decoding (flaxvae/models/tiling.py): exact for networks without spatial
context, within the stated seam error of whole-image processing for the KL autoencoder, and
the one-line errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxvae import defaults, models, settings
from flaxvae.errors import ConfigError
from flaxvae.models import tiling
from flaxvae.objectives import likelihoods

LAPLACE = likelihoods.get_likelihood("laplace")
TINY = dict(channels=8, channel_multipliers=(1, 2), num_res_blocks=1, norm_groups=4)
# The differences from whole-image processing that the tiny random-weight autoencoder below
# shows with its tiles (GroupNorm over a tile, the receptive field cut at the tile), with a
# margin: max and mean absolute, decoded images in [0, 1] units, posterior means in units of
# their standard deviation. Random weights amplify GroupNorm's differences (docs/interop.md).
DECODE_MAX, DECODE_MEAN = 0.7, 0.13
ENCODE_MAX, ENCODE_MEAN = 2.3, 0.35


def tiny_settings(**keys):
  return settings.resolve_model(defaults.model_config("autoencoder_kl", **{**TINY, **keys}))


def upsample(x):
  return jnp.repeat(jnp.repeat(x, 4, axis=1), 4, axis=2)


def test_blend_weights_sum_to_one_and_ramp_linearly():
  starts = tiling.tile_starts(40, 16, 12)
  assert starts == [0, 12, 24]
  weights = tiling.blend_weights(starts, 16, 4, 40)
  total = np.zeros(40)
  for start, w in zip(starts, weights):
    total[start : start + 16] += w
  np.testing.assert_allclose(total, 1.0)
  assert weights[0][0] == 1.0 and weights[-1][-1] == 1.0  # no ramp at the image's border
  np.testing.assert_allclose(np.diff(weights[1][:4]), 0.25)  # a linear ramp over the overlap


def test_networks_without_spatial_context_tile_exactly():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 20, 28, 3)), jnp.float32)
  np.testing.assert_allclose(tiling.tiled(lambda t: t, x, 8, 3), x, atol=1e-6)
  np.testing.assert_allclose(tiling.tiled(upsample, x, 8, 2), upsample(x), atol=1e-6)
  pair = jax.jit(lambda x: tiling.tiled(lambda t: (t[:, ::4, ::4], 2 * t[:, ::4, ::4]), x, 8, 4))
  first, second = pair(x)
  np.testing.assert_allclose(first, x[:, ::4, ::4], atol=1e-6)
  np.testing.assert_allclose(second, 2 * x[:, ::4, ::4], atol=1e-6)


def test_tiled_autoencoder_is_within_the_seam_error_of_whole_images():
  model_settings, shape = tiny_settings(), (32, 32, 3)
  model = models.create_model(model_settings, image_shape=(16, 16, 3), likelihood=LAPLACE)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  whole = tiling.model_at_size(model_settings, LAPLACE, jnp.float32, (16, 16, 3), shape)
  tile = tiling.model_at_size(model_settings, LAPLACE, jnp.float32, (16, 16, 3), (16, 16, 3))
  grid = np.linspace(0, 4 * np.pi, 32)
  x = jnp.asarray((np.sin(grid[:, None] + grid[None, :])[None, ..., None] + 1) / 2 * [1, 0.5, 0.2])

  def both(params, x):
    big, small = nnx.merge(whole, params), nnx.merge(tile, params)
    image = lambda m: lambda z: jnp.clip(m.likelihood.mean(m.decode(z)), 0, 1)
    mean = big.encode(x)[0]
    return (
      image(big)(mean),
      tiling.tiled(image(small), mean, 8, 4),
      tiling.tiled(small.encode, x, 16, 8)[0],
      mean,
    )

  decoded, decoded_tiled, mean_tiled, mean = jax.jit(both)(params, x.astype(jnp.float32))
  assert decoded.shape == decoded_tiled.shape == (1, 32, 32, 3)
  assert mean_tiled.shape == mean.shape == (1, 16, 16, 4)
  decode_error = np.abs(np.asarray(decoded - decoded_tiled))
  encode_error = np.abs(np.asarray(mean - mean_tiled)) / float(jnp.std(mean))
  assert decode_error.max() < DECODE_MAX and decode_error.mean() < DECODE_MEAN
  assert encode_error.max() < ENCODE_MAX and encode_error.mean() < ENCODE_MEAN


def test_the_model_at_another_size_keeps_its_attention_levels():
  model_settings = tiny_settings(attention_resolutions=(8,))  # the second level at 16 px
  graphdef = tiling.model_at_size(model_settings, LAPLACE, jnp.float32, (16, 16, 3), (64, 64, 3))
  model = nnx.merge(
    graphdef,
    nnx.state(
      models.create_model(
        model_settings, image_shape=(16, 16, 3), likelihood=LAPLACE, abstract=True
      )
    ),
  )
  assert [len(level.attentions) for level in model.encoder.down_blocks] == [0, 1]
  assert model.image_shape == (64, 64, 3) and model.latent_hw == (32, 32)


@pytest.mark.parametrize(
  "tile, overlap, message",
  [(8, 8, "overlap in"), (0, 0, "tile must be positive"), (8, 2, "multiples of 4")],
)
def test_bad_tiles_fail_in_one_line(tile, overlap, message):
  x = jnp.zeros((1, 20, 20, 1))
  with pytest.raises(ConfigError, match=message) as error:
    tiling.tiled(lambda t: t[:, ::4, ::4], x, tile, overlap)
  assert "\n" not in str(error.value)
