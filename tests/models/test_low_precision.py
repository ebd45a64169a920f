"""float16 overflows where flaxvae's bfloat16 path does not (flaxvae/eval/precision.py): random
weights scaled so the decoder's up-block activations exceed float16's 65504, as the SDXL VAE's
do (its weights cannot be downloaded here)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxvae import defaults, models, settings
from flaxvae.eval import precision
from flaxvae.objectives import likelihoods

LAPLACE = likelihoods.get_likelihood("laplace")
SETTINGS = settings.resolve_model(
  defaults.model_config(
    "autoencoder_kl", channels=8, channel_multipliers=(1, 2), num_res_blocks=1, norm_groups=4
  )
)
SHAPE, FACTOR = (16, 16, 3), 3e4
BFLOAT16_ERROR = 0.05  # max abs difference from float32 of the decoded image, [0, 1] units


@functools.partial(jax.jit, static_argnums=1)
def decoded(params, dtype, z):
  """(stage maxima, decoded image in [0, 1]) in compute dtype `dtype`."""
  abstract = models.create_model(
    SETTINGS, image_shape=SHAPE, likelihood=LAPLACE, dtype=dtype, abstract=True
  )
  model = nnx.merge(nnx.split(abstract)[0], params)
  return precision.decoder_activation_maxima(model, z), model.likelihood.mean(model.decode(z))


def test_float16_overflows_where_bfloat16_stays_finite_and_close_to_float32():
  model = models.create_model(SETTINGS, image_shape=SHAPE, likelihood=LAPLACE)
  params = precision.scale_up_block_branches(nnx.to_pure_dict(nnx.state(model, nnx.Param)), FACTOR)
  z = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  maxima, reference = decoded(params, jnp.float32, z)
  assert max(float(v) for v in maxima.values()) > precision.FLOAT16_MAX
  _, half = decoded(params, jnp.float16, z)
  assert not np.isfinite(np.asarray(half)).all()
  _, brain = decoded(params, jnp.bfloat16, z)
  assert np.isfinite(np.asarray(brain)).all()
  assert float(jnp.max(jnp.abs(brain - reference))) < BFLOAT16_ERROR
