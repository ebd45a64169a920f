"""Prints the parity table of flaxvae's importer against diffusers' AutoencoderKL: per
configuration, image size and output, the largest absolute error, the largest absolute error
relative to the output's largest magnitude, the largest elementwise relative error (over
elements whose reference magnitude is at least 1e-3: near zero every rounding is large
relatively), and whether all elements are within numpy's allclose(rtol=1e-5, atol=1e-5), on
tests/fixtures/diffusers_vae, at the highest matmul precision. Runs in flaxvae's venv (no
torch):

  .venv/bin/python -m tests.reference.diffusers_vae_parity
"""

import jax
import jax.numpy as jnp
import numpy as np

from tests.interop.test_vae_weights import CONFIGS, imported, nchw, outputs
from tests.reference.diffusers_vae_configs import SIZES


def main():
  print(f"diffusers {outputs()['diffusers_version']}, flaxvae float32 at matmul precision highest")
  print(
    "| configuration | image | output | max abs error | max abs / max abs(ref) "
    "| max elementwise rel error | allclose 1e-5 |"
  )
  print("|---|---|---|---|---|---|---|")
  for name in CONFIGS:
    _, _, encode_decode, state = imported(name)
    for size in SIZES:
      x01 = (np.transpose(outputs()[f"{name}/{size}/x11"], (0, 2, 3, 1)) + 1.0) / 2.0
      with jax.default_matmul_precision("highest"):
        mean, logvar, raw = encode_decode(state, jnp.asarray(x01, jnp.float32))
      out11 = 2.0 * nchw(raw[..., 0::2]) - 1.0
      got = {"mean": nchw(mean), "logvar": nchw(logvar), "decoded": out11, "forward": out11}
      for key, value in got.items():
        expected = outputs()[f"{name}/{size}/{key}"].astype(np.float64)
        error = np.abs(value - expected)
        large = np.abs(expected) >= 1e-3
        relative = np.max(error[large] / np.abs(expected[large]))
        to_scale = error.max() / np.abs(expected).max()
        close = np.allclose(value, expected, rtol=1e-5, atol=1e-5)
        print(
          f"| {name} | {size}x{size} | {key} | {error.max():.2e} | {to_scale:.2e} "
          f"| {relative:.2e} | {close} |"
        )


if __name__ == "__main__":
  main()
