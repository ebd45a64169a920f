"""Writes tests/fixtures/ssim_skimage.npz: SSIM by scikit-image, the reference that
tests/eval/test_image_metrics.py checks flaxvae's SSIM against, so `make test` needs no skimage.

Run once, in any venv with numpy and scikit-image (not flaxvae's):
  python -m venv /tmp/skvenv && /tmp/skvenv/bin/pip install numpy scikit-image
  /tmp/skvenv/bin/python tests/reference/ssim_skimage.py
Pairs: random images against noisy, blurred and shifted copies, in colour and grey, each scored
as Wang et al. (2004) define SSIM (skimage's gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1).
"""

import pathlib

import numpy as np
import skimage
from skimage.metrics import structural_similarity

OUT = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "ssim_skimage.npz"


def pairs(rng, shape):
  x = rng.uniform(0, 1, shape).astype(np.float32)
  smooth = np.cumsum(np.cumsum(rng.normal(size=shape), axis=1), axis=2)
  smooth = ((smooth - smooth.min()) / (smooth.max() - smooth.min())).astype(np.float32)
  originals = np.stack([x, smooth, smooth, x])
  noisy = np.clip(smooth + rng.normal(0, 0.1, shape), 0, 1)
  shifted = np.roll(smooth, 2, axis=1)
  blurred = (x + np.roll(x, 1, axis=0) + np.roll(x, 1, axis=1)) / 3
  others = np.stack([rng.uniform(0, 1, shape), noisy, shifted, blurred]).astype(np.float32)
  return originals, others


def main():
  rng = np.random.default_rng(34)
  out = {"skimage_version": np.asarray(skimage.__version__)}
  for name, shape in (("colour", (16, 20, 3)), ("grey", (24, 24, 1))):
    x, y = pairs(rng, shape)
    scores = [
      structural_similarity(
        a,
        b,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1.0,
        channel_axis=-1,
      )
      for a, b in zip(x.astype(np.float64), y.astype(np.float64))
    ]
    out.update({f"{name}_x": x, f"{name}_y": y, f"{name}_ssim": np.asarray(scores)})
  np.savez(OUT, **out)
  print(OUT, {k: v for k, v in out.items() if k.endswith("ssim")})


if __name__ == "__main__":
  main()
