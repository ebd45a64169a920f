"""The reconstruction metrics in evaluation rows (flaxvae/eval/reconstruction.py), on a fake
autoencoder whose reconstructions and latents are known in closed form: it reconstructs
clip(x + OFFSET) from the posterior mean and its latents are (x + OFFSET, 2x) with a negligible
posterior variance. LPIPS and Inception are replaced by tiny known functions (their own parity
tests are elsewhere): these tests check the wiring (weights as arguments, the rows, the skips,
blocks and devices), the metrics themselves are tested in test_image_metrics.py."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from flaxvae import defaults
from flaxvae.eval import evaluation, image_metrics, inception, reconstruction, sampling
from flaxvae.eval.evaluator import Evaluator
from flaxvae.models import contract
from flaxvae.models.registry import MODELS
from flaxvae.objectives import gaussian, perceptual
from flaxvae.run import Run
from tests.conftest import array_dataset, tiny_config

SIDE, OFFSET, LOGVAR = 16, 0.1, -30.0  # 16 px: SSIM's 11 px window and LPIPS' 16 px fit
NUM_TEST = 24


@MODELS.register("fake_autoencoder")
class FakeAutoencoder(nnx.Module):
  """encode(x) = ((x + offset, 2x), LOGVAR); decode(z) = its first channel: the mean of a
  Gaussian likelihood with a fixed variance. A [SIDE, SIDE, 2] latent, as a conv autoencoder's."""

  CAPABILITIES = (contract.RECONSTRUCTION,)
  OUTPUT_LAYER = ("offset",)

  def __init__(self, *, image_shape, likelihood, rngs, dtype=jnp.float32):
    del rngs, dtype
    self.image_shape, self.likelihood = tuple(image_shape), likelihood
    self.offset = nnx.Param(jnp.float32(OFFSET))

  @property
  def latent_shapes(self):
    return ((SIDE, SIDE, 2),)

  def encode(self, x):
    mean = jnp.concatenate([x + self.offset[...], 2.0 * x], axis=-1)
    return mean, jnp.full_like(mean, LOGVAR)

  def decode(self, z):
    return z[..., :1]

  def output_layer(self, params, features):
    return features[..., :1]

  def _layer(self, x, eps):
    mean, logvar = self.encode(x)
    z = mean + jnp.exp(0.5 * logvar) * eps
    flat = lambda a: jnp.broadcast_to(a, z.shape).reshape(*z.shape[:2], -1)
    return contract.LatentLayer(
      z=z,
      log_q=jnp.sum(flat(gaussian.log_normal_per_unit(z, mean, logvar)), -1),
      log_p=jnp.sum(flat(gaussian.log_normal_per_unit(z, 0.0, 0.0)), -1),
      kl=flat(gaussian.kl_per_unit(mean, logvar)),
      q_mean=flat(mean),
    )

  def terms(self, x, noise):
    layer = self._layer(x, noise.normal(0, self.latent_shapes[0]))
    return contract.Terms(self.likelihood.log_prob(self.decode(layer.z), x), (layer,))

  def reconstruct_for_training(self, x, noise):
    layer = self._layer(x, noise.normal(0, self.latent_shapes[0]))
    return contract.Reconstruction(self.decode(layer.z[0]), (layer,), layer.z[0])

  def log_prior(self, zs):
    return gaussian.log_standard_normal(zs[0].reshape(zs[0].shape[0], -1))

  def log_joint(self, x, zs):
    return self.likelihood.log_prob(self.decode(zs[0]), x) + self.log_prior(zs)

  def prior_sample(self, key, n):
    return (jax.random.normal(key, (n, *self.latent_shapes[0])),)

  def generate(self, zs):
    return self.decode(zs[0])

  def sample(self, key, n, temperature=1.0):
    return self.decode(self.prior_sample(key, n)[0])

  def reconstruct(self, x, noise, keep_layers=1):
    return self.decode(self._layer(x, noise.normal(0, self.latent_shapes[0])).z[0])


def fake_config(**changes):
  config = tiny_config(**changes)
  config.model = defaults.model_config("fake_autoencoder")
  config.objective.likelihood, config.objective.gaussian_logvar = "gaussian", -2.0
  config.data.protocol = "grey"  # x = k / 255, as the model sees it
  return config


def run_and_evaluator(config, test=NUM_TEST):
  run = Run(config, array_dataset(train=16, test=test, shape=(SIDE, SIDE, 1)))
  return run, Evaluator(run.runner, run.eval_images, config.eval.batch_size)


def fake_lpips(weights, x11, y11):
  """A stand-in with LPIPS's signature: weights["scale"] x the mean absolute difference."""
  return weights["scale"] * jnp.mean(jnp.abs(x11 - y11), axis=(1, 2, 3))


def fake_inception_module():
  """Stand-ins for flaxvae.eval.inception's functions: 4 features per image (channel means of 2x2
  quadrants), so the Frechet distance is computable in numpy."""

  def inception_features(weights, images01):
    assert images01.shape[-1] == 3  # grey images arrive as RGB
    b, h, w, _ = images01.shape
    quadrants = images01[..., 0].reshape(b, 2, h // 2, 2, w // 2).mean(axis=(2, 4))
    return weights["gain"] * quadrants.reshape(b, 4)

  return types.SimpleNamespace(
    inception_features=inception_features,
    load_inception_weights=lambda: {"gain": np.float32(3.0)},
  )


def use_inception(mp, module):
  """Inception's features and loader replaced by those of `module`."""
  mp.setattr(inception, "inception_features", module.inception_features)
  mp.setattr(inception, "load_inception_weights", module.load_inception_weights)


def expected(images_uint8):
  """What the fake model's metrics are, from numpy: per-image PSNR and SSIM, latent stats."""
  x = images_uint8.astype(np.float32) / 255.0
  recon = np.clip(x + np.float32(OFFSET), 0, 1)
  psnr = 10 * np.log10(1 / np.mean((x - recon) ** 2, axis=(1, 2, 3), dtype=np.float64))
  ssim = np.asarray(image_metrics.ssim(jnp.asarray(x), jnp.asarray(recon)))
  z = np.concatenate([x + OFFSET, 2 * x], axis=-1).astype(np.float64).reshape(-1, 2)
  return x, recon, psnr, ssim, z


@pytest.fixture(scope="module")
def fake_run():
  return run_and_evaluator(fake_config(**{"eval.final_num_examples": 20}))


@pytest.fixture(scope="module")
def final_row(fake_run):
  """The final evaluation of the fake model with LPIPS and Inception stand-ins."""
  run, evaluator = fake_run
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(perceptual, "lpips", fake_lpips)
    mp.setattr(perceptual, "load_lpips_weights", lambda: {"scale": np.float32(2.0)})
    use_inception(mp, fake_inception_module())
    row = evaluation.final_evaluation(
      run, evaluator, run.params, evaluation.eval_rng(run.settings.seed)
    )
  return run, row


def test_the_final_row_has_every_reconstruction_metric_at_its_known_value(final_row):
  run, row = final_row
  x, recon, psnr, ssim, z = expected(run.eval_images[:20])
  assert row["num_examples"] == 20
  assert not {"ssim", "lpips", "rfid"} & set(row.get("skipped", {}))
  assert row["psnr"] == pytest.approx(psnr.mean(), rel=1e-5)
  assert row["psnr_stderr"] == pytest.approx(psnr.std(ddof=1) / np.sqrt(20), rel=1e-4)
  assert row["ssim"] == pytest.approx(ssim.mean(), abs=1e-6)
  lpips = 2.0 * np.mean(np.abs(2 * x - 2 * recon), axis=(1, 2, 3))  # in [-1, 1] units
  assert row["lpips"] == pytest.approx(lpips.mean(), rel=1e-5)
  # latents: posterior samples whose std is e^-15, so their statistics are the means'
  np.testing.assert_allclose(row["latent_mean"], z.mean(0), rtol=1e-5)
  np.testing.assert_allclose(row["latent_std"], z.std(0, ddof=1), rtol=1e-5)
  assert row["latent_shift"] == pytest.approx(z.mean(), rel=1e-5)
  assert row["latent_scale"] == pytest.approx(1 / z.std(ddof=1), rel=1e-5)
  assert row["latent_scale_ldm"] == row["latent_scale"]
  # rFID: the stand-in's features of reconstructions against originals, as numpy fits them
  features = lambda v: 3.0 * v[..., 0].reshape(20, 2, SIDE // 2, 2, SIDE // 2).mean((2, 4))
  fr, fo = features(recon).reshape(20, 4), features(x).reshape(20, 4)
  rfid = image_metrics.frechet_distance(
    fr.mean(0), np.cov(fr, rowvar=False), fo.mean(0), np.cov(fo, rowvar=False)
  )
  assert row["rfid"] == pytest.approx(rfid, rel=1e-4) and row["rfid_examples"] == 20
  # the rate is the importance pass's: the analytic KL summed over the latent
  kl = 0.5 * np.sum(z.reshape(20, -1) ** 2 + np.exp(LOGVAR) - 1 - LOGVAR, axis=1)
  assert row["rate"] == pytest.approx(kl.mean(), rel=1e-5)
  assert evaluation.format_table(row)


def test_blocks_and_rfid_examples_give_the_same_figures(final_row, monkeypatch, tmp_path):
  """Blocks of one batch, and rFID over the first 12 only: the per-example figures and latent
  statistics stay those of the whole set (latent samples are keyed by example id)."""
  run, row = final_row
  monkeypatch.setenv("FLAXVAE_WEIGHTS_DIR", str(tmp_path))  # no LPIPS weights
  monkeypatch.setattr(reconstruction, "BLOCK_BATCHES", 1)
  use_inception(monkeypatch, fake_inception_module())
  evaluator = Evaluator(run.runner, run.eval_images, 8)  # 1 per device: 3 blocks
  eval_settings = types.SimpleNamespace(rfid_examples=12)
  found = reconstruction.reconstruction_metrics(
    run, evaluator, run.params, evaluation.eval_rng(0), 20, True, lambda _: None, eval_settings
  )
  assert found["rfid_examples"] == 12 and found["skipped"]["lpips"]  # no weights here
  assert np.mean(found["psnr"]) == pytest.approx(row["psnr"], rel=1e-6)
  np.testing.assert_allclose(found["latent_std"], row["latent_std"], rtol=1e-6)
  assert found["latent_scale"] == pytest.approx(row["latent_scale"], rel=1e-9)


def test_blocks_cover_the_examples_with_inception_on_the_first():
  assert reconstruction.blocks(10, 4, 3) == [
    (0, 3, True),
    (3, 4, True),
    (4, 7, False),
    (7, 10, False),
  ]
  assert reconstruction.blocks(5, 0, 8) == [(0, 5, False)]


def test_without_weights_lpips_and_rfid_are_skipped_with_how_to_get_them(
  fake_run, tmp_path, monkeypatch
):
  """No weights in $FLAXVAE_WEIGHTS_DIR: the row names what is missing and how to prepare it;
  the periodic evaluation leaves rFID to the final one."""
  monkeypatch.setenv("FLAXVAE_WEIGHTS_DIR", str(tmp_path))
  run, evaluator = fake_run
  rng = evaluation.eval_rng(run.settings.seed)
  row = evaluation.periodic_evaluation(run, evaluator, run.params, rng)
  assert "lpips" not in row and "rfid" not in row
  assert "flaxvae weights prepare lpips_vgg16" in row["skipped"]["lpips"]
  assert "final evaluation" in row["skipped"]["rfid"]
  assert "psnr" in row and "ssim" in row and len(row["latent_mean"]) == 2
  missing = fake_inception_module()
  missing.load_inception_weights = perceptual.load_lpips_weights  # raises WeightsMissing
  use_inception(monkeypatch, missing)
  found = reconstruction.reconstruction_metrics(
    run, evaluator, run.params, rng, 8, True, lambda _: None, run.settings.eval
  )
  assert "flaxvae weights prepare" in found["skipped"]["rfid"] and "rfid" not in found


def test_other_models_get_no_reconstruction_fields_unless_asked(monkeypatch):
  """An MLP VAE's rows are as they were; asked for (a baseline on the same figures), its flat
  latent counts as one position of latent_dim channels, and 8 px images skip SSIM and LPIPS."""
  monkeypatch.setattr(perceptual, "load_lpips_weights", lambda: {"scale": np.float32(2.0)})
  run = Run(tiny_config("mlp"), array_dataset(train=16, test=8, shape=(8, 8, 1)))
  evaluator = Evaluator(run.runner, run.eval_images, 8)
  row = evaluation.periodic_evaluation(run, evaluator, run.params, evaluation.eval_rng(0))
  assert not {"psnr", "ssim", "lpips", "rfid", "latent_mean"} & set(row)
  assert not {"ssim", "lpips", "rfid", "reconstruction"} & set(row.get("skipped", {}))
  assert not reconstruction.applies(run.model, run.settings.eval)
  asked = types.SimpleNamespace(reconstruction_metrics=True)
  assert reconstruction.applies(run.model, asked)
  found = reconstruction.reconstruction_metrics(
    run, evaluator, run.params, evaluation.eval_rng(0), None, False, lambda _: None, asked
  )
  assert "11 pixels" in found["skipped"]["ssim"] and "16 pixels" in found["skipped"]["lpips"]
  assert found["psnr"].shape == (8,) and len(found["latent_mean"]) == 2


def test_the_grid_puts_each_original_above_its_mean_reconstruction(fake_run, tmp_path):
  run, _ = fake_run
  sampling.save_image_grids(run, run.params, str(tmp_path), 7, n=8, seed=0)
  grid = np.asarray(Image.open(tmp_path / "images" / "reconstructions_mean_0000007.png"))
  x, recon, *_ = expected(run.eval_images[:4])
  columns = 2  # n // 4, as the sampled reconstructions' grid beside it
  cell = lambda r, c: grid[1 + r * (SIDE + 1) :][:SIDE, 1 + c * (SIDE + 1) :][:, :SIDE]
  for i in range(4):
    row, col = 2 * (i // columns), i % columns
    np.testing.assert_array_equal(cell(row, col), np.round(255 * x[i, ..., 0]))
    np.testing.assert_allclose(cell(row + 1, col), np.round(255 * recon[i, ..., 0]), atol=1)
