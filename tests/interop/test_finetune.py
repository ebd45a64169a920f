"""An imported KL autoencoder evaluates, and fine-tunes its decoder alone through train() on 8
devices with configs/finetune_sd_vae_decoder.py (the SD-VAE-ft recipe): the source is a tiny
random autoencoder written in diffusers' layout, the data the on-disk `tiny` set, LPIPS's
weights random (tests/train/test_two_players.py's fixture)."""

import jax
import numpy as np
import pytest
from flax import nnx

from flaxvae import api, defaults, models, settings
from flaxvae.interop import vae_weights
from flaxvae.objectives import likelihoods
from flaxvae.train import checkpoint
from flaxvae.train.trainer import train
from tests import conftest
from tests.train.test_fault_tolerance import saved_state
from tests.train.test_two_players import lpips_weights  # noqa: F401  (autouse: random LPIPS)

SHAPE = (28, 28, 1)
OPTIONS = dict(channels=8, channel_multipliers=(1, 2), num_res_blocks=1, norm_groups=4)


@pytest.fixture(scope="module")
def imported(tmp_path_factory, tiny_data_dir):
  """A workdir imported from a random autoencoder in diffusers' layout (1 colour, 28 px)."""
  root = tmp_path_factory.mktemp("finetune")
  model = models.create_model(
    settings.resolve_model(defaults.model_config("autoencoder_kl", **OPTIONS)),
    image_shape=SHAPE,
    likelihood=likelihoods.get_likelihood("laplace"),
    seed=7,
  )
  full = defaults.model_config("autoencoder_kl", **OPTIONS)
  state = vae_weights.params_to_diffusers(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  cfg = vae_weights.diffusers_config(full, SHAPE, {"scaling_factor": 0.5})
  source = vae_weights.write_diffusers(str(root / "source"), state, cfg)
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("FLAXVAE_DATA_DIR", str(tiny_data_dir))
    workdir = api.import_weights(source, str(root / "imported"), data="tiny")
    yield workdir


def test_an_imported_model_evaluates(imported):
  row, _ = api.evaluate(imported, max_examples=8)
  assert row["step"] == 0 and np.isfinite(row["psnr"]) and np.isfinite(row["elbo"])


@pytest.mark.parametrize(
  "stage",
  [pytest.param("", marks=pytest.mark.slow), pytest.param(",mse,bf16", marks=pytest.mark.slow)],
  ids=["l1", "mse_bf16"],
)
def test_the_decoder_alone_fine_tunes_on_8_devices(imported, tmp_path, stage):
  assert jax.device_count() == 8
  config = conftest.load_config("finetune_sd_vae_decoder", f"{imported},tiny{stage}")
  assert tuple(config.optimizer.frozen) == ("encoder", "quant_conv") and config.ema_decay
  train(config, str(tmp_path), conftest.array_dataset(32, 16, SHAPE))
  before, after = checkpoint.trained_params(imported), saved_state(tmp_path, config.num_steps)
  same = lambda group, params="params": all(
    np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(before[group]), jax.tree.leaves(after[params][group]))
  )
  assert same("encoder") and same("quant_conv")
  assert not same("decoder") and not same("post_quant_conv")
  # the EMA of a frozen group moves by rounding only (decay * p + (1 - decay) * p)
  for a, b in zip(
    jax.tree.leaves(before["encoder"]), jax.tree.leaves(after["ema_params"]["encoder"])
  ):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
