"""Reconstruction metrics as pure functions: PSNR, SSIM, the Frechet distance, latent statistics.

The latent autoencoders (issue 34) are judged by how close a reconstruction is to its image,
pixel by pixel (PSNR), in local structure (SSIM), perceptually (LPIPS, objectives/perceptual.py)
and as a distribution (rFID: the Frechet distance between Inception features of the
reconstructions and of the originals), and by the statistics of their latents that a latent
diffusion model needs (its scale and shift). The per-image metrics are jnp functions that run
inside the evaluator's per-device functions; the Frechet distance and the streamed moments run
on the host in float64, where covariances of 2048 features over thousands of images stay exact.

Conventions (the published ones, so figures compare):
  psnr   per image, 10 log10(data_range^2 / MSE) over all its pixels and channels; an
         evaluation reports the mean over images (not the PSNR of the mean MSE)
  ssim   Wang et al. (2004): an 11x11 Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03, the
         window's population (co)variances, the map over the window's valid positions, its
         mean per channel, then the mean over channels: skimage's structural_similarity with
         gaussian_weights=True, sigma=1.5, use_sample_covariance=False and data_range
  fid    ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), the covariances with the
         unbiased (n - 1) normalisation as pytorch-fid's np.cov
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
MIN_MSE = 1e-10  # identical images score 100 dB (data range 1), a finite figure to average


def psnr(x, y, data_range=1.0):
  """[b] peak signal-to-noise ratio in dB of images y against x ([b, H, W, C], same range)."""
  diff = x.astype(jnp.float32) - y.astype(jnp.float32)
  mse = jnp.mean(jnp.square(diff), axis=tuple(range(1, diff.ndim)))
  return 10.0 * jnp.log10(data_range**2 / jnp.maximum(mse, MIN_MSE))


def gaussian_window(size=SSIM_WINDOW, sigma=SSIM_SIGMA):
  """The normalised 1-D Gaussian taps of SSIM's separable window (numpy, float64)."""
  offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
  taps = np.exp(-0.5 * (offsets / sigma) ** 2)
  return taps / taps.sum()


def _valid_blur(images, taps):
  """The separable window's weighted means at its valid positions: [n, H, W, 1] ->
  [n, H - size + 1, W - size + 1, 1]."""
  size = len(taps)
  dims = ("NHWC", "HWIO", "NHWC")
  for kernel_shape in ((size, 1, 1, 1), (1, size, 1, 1)):
    images = jax.lax.conv_general_dilated(
      images,
      jnp.asarray(taps, jnp.float32).reshape(kernel_shape),
      (1, 1),
      "VALID",
      dimension_numbers=dims,
      precision=jax.lax.Precision.HIGHEST,
    )
  return images


def ssim(x, y, data_range=1.0):
  """[b] structural similarity of images y against x ([b, H, W, C], H and W at least 11), the
  mean over channels of each channel's mean SSIM map (module doc)."""
  b, height, width, channels = x.shape
  if min(height, width) < SSIM_WINDOW:
    raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW} pixels a side, got {x.shape}")
  # channels become images of one channel: [b * C, H, W, 1]
  planes = lambda v: jnp.moveaxis(v.astype(jnp.float32), -1, 1).reshape(-1, height, width, 1)
  x, y = planes(x), planes(y)
  # (co)variances do not change with a shift: taken about each plane's mean, float32 loses
  # little to the cancellation of E[x^2] - E[x]^2
  offset_x, offset_y = (
    jnp.mean(x, axis=(1, 2), keepdims=True),
    jnp.mean(y, axis=(1, 2), keepdims=True),
  )
  x, y = x - offset_x, y - offset_y
  taps = gaussian_window()
  mu_x, mu_y = _valid_blur(x, taps), _valid_blur(y, taps)
  var_x = _valid_blur(x * x, taps) - mu_x * mu_x
  var_y = _valid_blur(y * y, taps) - mu_y * mu_y
  cov = _valid_blur(x * y, taps) - mu_x * mu_y
  mu_x, mu_y = mu_x + offset_x, mu_y + offset_y
  c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
  ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
    (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
  )
  return jnp.mean(ssim_map.reshape(b, channels, -1), axis=(1, 2))


# ----------------------------------------------------------------------------
# Host side, float64: streamed moments and the Frechet distance
# ----------------------------------------------------------------------------
def merge_moments(total, batch, product):
  """(count, mean, centred sum of products) of two sets from each set's own (Chan et al.'s
  parallel update): `product(d, d)` is np.outer for a scatter matrix, np.multiply for per-unit
  sums of squares."""
  count, mean, scatter = total
  n, batch_mean, batch_scatter = batch
  if count == 0:
    return batch
  merged = count + n
  delta = batch_mean - mean
  scatter = scatter + batch_scatter + product(delta, delta) * (count * n / merged)
  return merged, mean + delta * (n / merged), scatter


class StreamingMoments:
  """Mean and covariance of feature vectors given a batch at a time, in float64 on the host.

  Merges each batch's own mean and centred scatter (Chan et al.'s parallel update), so no
  sum of squares of raw features is formed and large means cost no precision. Memory is one
  [d, d] matrix whatever the number of batches.
  """

  def __init__(self):
    self.count, self.mean, self.scatter = 0, None, None

  def update(self, features):
    """Adds `features` [n, d] (any float dtype)."""
    features = np.asarray(features, np.float64)
    n = len(features)
    if n == 0:
      return self
    batch_mean = features.mean(axis=0)
    centred = features - batch_mean
    self.count, self.mean, self.scatter = merge_moments(
      (self.count, self.mean, self.scatter), (n, batch_mean, centred.T @ centred), np.outer
    )
    return self

  def covariance(self):
    """The unbiased covariance [d, d] (np.cov's normalisation); needs two vectors or more."""
    if self.count < 2:
      raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
    return self.scatter / (self.count - 1)


def _psd_sqrt(matrix):
  """The symmetric positive semi-definite square root of a symmetric matrix (float64), its
  eigenvalues clipped at 0 (rounding makes tiny ones of a rank-deficient covariance negative)."""
  values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
  return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def trace_sqrt_product(sigma1, sigma2):
  """tr((S1 S2)^(1/2)) for covariances S1, S2: the eigenvalues of S1 S2 are those of the
  symmetric S1^(1/2) S2 S1^(1/2), so the trace is the sum of their square roots, computed by
  symmetric eigendecompositions without the complex rounding of a general matrix square root."""
  root = _psd_sqrt(sigma1)
  values = np.linalg.eigvalsh(root @ sigma2 @ root)
  return float(np.sum(np.sqrt(np.clip(values, 0.0, None))))


def frechet_distance(mu1, sigma1, mu2, sigma2):
  """The Frechet (2-Wasserstein squared) distance between N(mu1, sigma1) and N(mu2, sigma2)."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f"Gaussians of different sizes: {mu1.shape} and {mu2.shape}")
  distance = np.sum(np.square(mu1 - mu2)) + np.trace(sigma1) + np.trace(sigma2)
  return float(max(0.0, distance - 2.0 * trace_sqrt_product(sigma1, sigma2)))


def frechet_distance_of(moments1: StreamingMoments, moments2: StreamingMoments):
  """The Frechet distance between the Gaussians fitted to two streams of features."""
  return frechet_distance(
    moments1.mean, moments1.covariance(), moments2.mean, moments2.covariance()
  )


# ----------------------------------------------------------------------------
# Latent statistics: what a latent diffusion model normalises its latents with
# ----------------------------------------------------------------------------
def latent_channel_moments(z):
  """Per example and channel, the mean and the centred sum of squares of latents z
  [b, h, w, c] over their positions: ([b, c], [b, c]), merged exactly by `LatentStatistics`."""
  z = z.astype(jnp.float32)
  mean = jnp.mean(z, axis=(1, 2))
  return mean, jnp.sum(jnp.square(z - mean[:, None, None, :]), axis=(1, 2))


class LatentStatistics:
  """Per-channel mean and standard deviation of latents over examples and positions, streamed.

  `update(mean, m2, positions)` takes latent_channel_moments' per-example figures of a batch
  (positions = h * w). `summary()` gives what latent diffusion models derive from them, every
  standard deviation unbiased (torch's std): per channel latent_mean and latent_std [c]; LDM's
  scale_factor latent_scale_ldm = 1 / std of all latent elements flattened together; SD3 and
  FLUX's latent_shift = their mean and latent_scale = 1 / their std, latents normalised as
  (z - shift) * scale.
  """

  def __init__(self):
    self.count, self.mean, self.m2 = 0, None, None  # elements per channel; [c]; [c]

  def update(self, example_means, example_m2, positions):
    example_means = np.asarray(example_means, np.float64)
    example_m2 = np.asarray(example_m2, np.float64)
    n = len(example_means) * positions
    if n == 0:
      return self
    batch_mean = example_means.mean(axis=0)
    batch_m2 = example_m2.sum(axis=0) + positions * np.sum(
      np.square(example_means - batch_mean), axis=0
    )
    self.count, self.mean, self.m2 = merge_moments(
      (self.count, self.mean, self.m2), (n, batch_mean, batch_m2), np.multiply
    )
    return self

  def summary(self):
    if self.count < 2:
      raise ValueError(f"latent statistics need at least 2 elements per channel, got {self.count}")
    channels = len(self.mean)
    shift = float(self.mean.mean())  # every channel has the same number of elements
    m2_all = float(self.m2.sum() + self.count * np.sum(np.square(self.mean - shift)))
    std_all = math.sqrt(m2_all / (self.count * channels - 1))
    return {
      "latent_mean": self.mean.tolist(),
      "latent_std": np.sqrt(self.m2 / (self.count - 1)).tolist(),
      "latent_scale_ldm": 1.0 / std_all,
      "latent_shift": shift,
      "latent_scale": 1.0 / std_all,
    }
