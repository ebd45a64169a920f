"""Each reconstruction metric against a known answer: PSNR of pairs with a constructed MSE, SSIM
against scikit-image (a stored fixture, tests/reference/ssim_skimage.py), the Frechet distance
against its closed form for diagonal covariances and ~0 for a set against itself, and the
streamed moments and latent statistics against numpy over the whole set at once."""

import math
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from flaxvae.eval import image_metrics

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "ssim_skimage.npz"


def test_psnr_of_pairs_with_a_constructed_mse_is_per_image():
  x = np.full((3, 8, 6, 3), 0.5, np.float32)
  # every pixel off by +-delta: MSE = delta^2, PSNR = -20 log10(delta)
  deltas = np.array([0.1, 0.01, 0.25], np.float32)
  signs = np.where(np.random.default_rng(0).random(x.shape) < 0.5, -1, 1).astype(np.float32)
  y = x + signs * deltas[:, None, None, None]
  got = np.asarray(image_metrics.psnr(jnp.asarray(x), jnp.asarray(y)))
  np.testing.assert_allclose(got, -20 * np.log10(deltas), rtol=1e-5)
  # a data range of 255: the same images in 8-bit units score the same
  scaled = image_metrics.psnr(jnp.asarray(255 * x), jnp.asarray(255 * y), data_range=255.0)
  np.testing.assert_allclose(np.asarray(scaled), got, rtol=1e-5)
  # one pixel of one image off by 1: MSE = 1 / pixels
  z = x.copy()
  z[1, 2, 3, 0] += 1.0
  got = np.asarray(image_metrics.psnr(jnp.asarray(x), jnp.asarray(z)))
  assert got[1] == pytest.approx(10 * math.log10(x[0].size), rel=1e-5)
  assert got[0] == got[2] == pytest.approx(100.0)  # identical: the MSE floor, finite


def test_ssim_of_an_image_with_itself_is_one():
  x = np.random.default_rng(1).random((2, 16, 16, 3)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(image_metrics.ssim(jnp.asarray(x), jnp.asarray(x))), 1.0)


@pytest.mark.parametrize("name", ["colour", "grey"])
def test_ssim_matches_scikit_image(name):
  """skimage's structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1, channel_axis=-1), stored by the reference script."""
  fixture = np.load(FIXTURE)
  got = image_metrics.ssim(jnp.asarray(fixture[f"{name}_x"]), jnp.asarray(fixture[f"{name}_y"]))
  np.testing.assert_allclose(np.asarray(got), fixture[f"{name}_ssim"], atol=1e-6)


def test_ssim_of_constant_images_has_its_closed_form():
  """Constant images a and b: no variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1)."""
  a, b = 0.3, 0.7
  x, y = np.full((1, 12, 12, 1), a, np.float32), np.full((1, 12, 12, 1), b, np.float32)
  c1 = (0.01 * 1.0) ** 2
  expected = (2 * a * b + c1) / (a * a + b * b + c1)
  assert float(image_metrics.ssim(jnp.asarray(x), jnp.asarray(y))[0]) == pytest.approx(expected)


def test_ssim_refuses_images_smaller_than_its_window():
  x = jnp.zeros((1, 10, 32, 1))
  with pytest.raises(ValueError, match="at least 11"):
    image_metrics.ssim(x, x)


def test_streamed_moments_equal_numpy_over_the_whole_set():
  rng = np.random.default_rng(2)
  features = (rng.normal(size=(103, 5)) * [1, 2, 3, 4, 5] + 1e4).astype(np.float32)
  moments = image_metrics.StreamingMoments()
  for start, stop in ((0, 1), (1, 40), (40, 40), (40, 103)):  # uneven, one empty
    moments.update(features[start:stop])
  exact = features.astype(np.float64)
  assert moments.count == 103
  np.testing.assert_allclose(moments.mean, exact.mean(0), rtol=1e-12)
  np.testing.assert_allclose(moments.covariance(), np.cov(exact, rowvar=False), rtol=1e-9)


def test_frechet_distance_of_a_set_against_itself_is_zero():
  features = np.random.default_rng(3).normal(size=(500, 64))
  moments = image_metrics.StreamingMoments().update(features)
  assert image_metrics.frechet_distance_of(moments, moments) == pytest.approx(0.0, abs=1e-8)
  # fewer vectors than features: a rank-deficient covariance, still ~0, never NaN
  few = image_metrics.StreamingMoments().update(features[:20])
  assert image_metrics.frechet_distance_of(few, few) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_of_gaussians_with_diagonal_covariances_has_its_closed_form():
  rng = np.random.default_rng(4)
  mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
  s1, s2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
  closed = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
  got = image_metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
  assert got == pytest.approx(closed, rel=1e-12)
  # the same Gaussians rotated together: the distance is invariant
  q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
  rotated = image_metrics.frechet_distance(
    q @ mu1, q @ np.diag(s1) @ q.T, q @ mu2, q @ np.diag(s2) @ q.T
  )
  assert rotated == pytest.approx(closed, rel=1e-9)


def test_frechet_distance_of_two_sampled_feature_sets_approaches_the_closed_form():
  """Features drawn from two known Gaussians: the fitted distance is the closed form up to the
  sampling error of the moments."""
  rng = np.random.default_rng(5)
  mu1, mu2 = np.zeros(4), np.array([1.0, -1.0, 0.5, 0.0])
  s1, s2 = np.array([1.0, 2.0, 0.5, 1.0]), np.array([2.0, 1.0, 0.5, 4.0])
  closed = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
  a, b = image_metrics.StreamingMoments(), image_metrics.StreamingMoments()
  for _ in range(10):  # batches
    a.update(mu1 + np.sqrt(s1) * rng.normal(size=(2000, 4)))
    b.update(mu2 + np.sqrt(s2) * rng.normal(size=(2000, 4)))
  assert image_metrics.frechet_distance_of(a, b) == pytest.approx(closed, rel=0.02)


def test_frechet_distance_matches_a_general_matrix_square_root():
  scipy_linalg = pytest.importorskip("scipy.linalg")
  rng = np.random.default_rng(6)
  a, b = rng.normal(size=(8, 8)), rng.normal(size=(8, 8))
  s1, s2 = a @ a.T + 0.1 * np.eye(8), b @ b.T
  mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
  root = np.real(scipy_linalg.sqrtm(s1 @ s2))
  expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(root)
  assert image_metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_latent_statistics_streamed_equal_numpy():
  rng = np.random.default_rng(7)
  z = (rng.normal(size=(13, 3, 2, 4)) * [0.5, 1, 2, 4] + [3, -1, 0, 0.1]).astype(np.float32)
  stats = image_metrics.LatentStatistics()
  for start, stop in ((0, 5), (5, 6), (6, 13)):
    mean, m2 = image_metrics.latent_channel_moments(jnp.asarray(z[start:stop]))
    stats.update(mean, m2, positions=3 * 2)
  got = stats.summary()
  exact = z.astype(np.float64)
  per_channel = exact.reshape(-1, 4)
  np.testing.assert_allclose(got["latent_mean"], per_channel.mean(0), rtol=1e-6)
  np.testing.assert_allclose(got["latent_std"], per_channel.std(0, ddof=1), rtol=1e-6)
  std_all = exact.flatten().std(ddof=1)  # LDM: 1 / z.flatten().std(), torch's unbiased std
  assert got["latent_scale_ldm"] == pytest.approx(1 / std_all, rel=1e-6)
  assert got["latent_shift"] == pytest.approx(exact.mean(), rel=1e-6)
  assert got["latent_scale"] == pytest.approx(1 / std_all, rel=1e-6)
  normalised = (exact - got["latent_shift"]) * got["latent_scale"]  # SD3 / FLUX
  assert normalised.mean() == pytest.approx(0, abs=1e-6)
  assert normalised.std(ddof=1) == pytest.approx(1, rel=1e-6)
