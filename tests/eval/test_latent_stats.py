"""`flaxvae latent-stats` (flaxvae/eval/latent_stats.py): per-channel latent moments and the
diffusion scale and shift, sharded over the 8 simulated devices, against numpy by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxvae import cli, defaults
from flaxvae.data import protocols
from flaxvae.eval import diagnostics, evaluation, latent_stats, reconstruction
from flaxvae.run import Run
from tests.conftest import array_dataset, tiny_config

TINY = dict(channels=8, channel_multipliers=(1, 2), num_res_blocks=1, norm_groups=4, pad_to=32)
NUM_TEST = 20  # not a multiple of the batch: the evaluator pads the last one


@pytest.fixture(scope="module")
def run():
  config = tiny_config()
  config.model = defaults.model_config("autoencoder_kl", **TINY)
  config.objective.likelihood, config.data.protocol = "laplace", "grey"
  return Run(config, array_dataset(train=16, test=NUM_TEST), for_training=False)


def latents_by_hand(run, images, rng, posterior):
  """The latents [n, h, w, c] as numpy float64: posterior means, or samples keyed by id."""
  ids = jnp.arange(len(images))
  x = protocols.eval_targets(jnp.asarray(images), ids, run.protocol)
  mean, logvar = jax.jit(lambda p, x: run.model_with(p).encode(x))(run.params, x)
  if posterior == "sample":
    keys = diagnostics.stream_keys(diagnostics.example_keys(rng, ids), reconstruction.LATENT_STREAM)
    eps = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:]))(keys)
    mean = mean + jnp.exp(0.5 * logvar) * eps
  return np.asarray(mean, np.float64)


@pytest.mark.parametrize("posterior", ["mean", pytest.param("sample", marks=pytest.mark.slow)])
def test_latent_statistics_match_numpy_by_hand(run, posterior):
  images, rng = run.dataset.images("test"), evaluation.eval_rng(0)
  found = latent_stats.latent_statistics(run, run.params, images, 16, rng, posterior)
  z = latents_by_hand(run, images, rng, posterior)
  channels = z.reshape(-1, z.shape[-1])
  np.testing.assert_allclose(found["latent_mean"], channels.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(found["latent_std"], channels.std(0, ddof=1), rtol=1e-5)
  assert found["latent_shift"] == pytest.approx(z.mean(), rel=1e-5, abs=1e-6)
  assert found["latent_scale"] == pytest.approx(1.0 / z.std(ddof=1), rel=1e-5)
  assert found["latent_scale_ldm"] == found["latent_scale"]


@pytest.mark.parametrize(
  "flags, message",
  [
    ([], "latent-stats needs --workdir"),
    (["--workdir=W", "--max_examples=-1"], "--max_examples must be >= 0"),
    (["--workdir=W", "--batch_size=0"], "--batch_size must be positive"),
    (["--workdir=W", "--posterior=median"], "posterior"),
  ],
)
def test_bad_flags_fail_in_one_line(capsys, tmp_path, flags, message):
  flags = [f.replace("W", str(tmp_path)) for f in flags]
  assert cli.main(["flaxvae", "latent-stats", *flags]) == 2
  err = capsys.readouterr().err.strip()
  assert message in err and "\n" not in err, err
