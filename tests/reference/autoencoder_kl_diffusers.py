"""Writes tests/fixtures/autoencoder_kl_diffusers.npz: diffusers' AutoencoderKL on random weights,
the reference that tests/models/test_autoencoder_kl.py checks flaxvae's autoencoder_kl against
(the same weights through the one-to-one name mapping), so `make test` needs no torch.

Run once, in a venv with torch and diffusers (not flaxvae's):
  .venv-ref/bin/python tests/reference/autoencoder_kl_diffusers.py
Two small layouts: SD's (quant convs, attention in the middle blocks only) and SD3/FLUX's (no
quant convs) with attention at the 8x8 level too (diffusers' Attn*Block2D, LDM's
attn_resolutions). Every parameter, GroupNorm's included, is drawn at random (`random_state`,
which the test replays from the stored names and shapes, so the fixture stays small) so that
no mapping error hides behind an initialisation of ones or zeros. Stored per layout: the state
dict's names and shapes (as diffusers has them), images x in [-1, 1] (NCHW), the posterior's
mean and clamped logvar, and the decoder's output for z = mean, computed in float64.
"""

import pathlib

import numpy as np

OUT = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "autoencoder_kl_diffusers.npz"

LAYOUTS = {
  "sd": dict(
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    use_quant_conv=True,
    use_post_quant_conv=True,
    latent_channels=4,
  ),
  "flux_attn8": dict(
    down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
    up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
    use_quant_conv=False,
    use_post_quant_conv=False,
    latent_channels=6,
  ),
}


SEED = 34


def random_state(keys, shapes, seed=SEED):
  """{diffusers name: float64 array of float32-representable values}, drawn in `keys` order:
  GroupNorm weights around 1, biases of scale 0.5, weights of scale 1 / sqrt(fan-in)."""
  rng = np.random.default_rng(seed)
  state = {}
  for key, shape in zip(keys, shapes):
    shape = tuple(int(d) for d in shape)
    scale = 0.5 if key.endswith("bias") else 1.0 / np.sqrt(max(1, int(np.prod(shape[1:]))))
    base = 1.0 if "norm" in key and key.endswith("weight") else 0.0
    values = base + scale * rng.normal(size=shape)
    state[key] = values.astype(np.float32).astype(np.float64)
  return state


def main():
  import diffusers  # the reference venv only, so the test can import random_state
  import torch

  rng = np.random.default_rng(SEED + 1)
  out = {"diffusers_version": np.asarray(diffusers.__version__)}
  for name, layout in LAYOUTS.items():
    model = diffusers.AutoencoderKL(
      in_channels=3,
      out_channels=3,
      block_out_channels=(8, 16),
      layers_per_block=1,
      norm_num_groups=4,
      sample_size=16,
      **layout,
    ).double()
    keys = list(model.state_dict())
    shapes = [tuple(p.shape) for p in model.state_dict().values()]
    model.load_state_dict({k: torch.from_numpy(v) for k, v in random_state(keys, shapes).items()})
    x = rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32).astype(np.float64)
    with torch.no_grad():
      posterior = model.encode(torch.from_numpy(x)).latent_dist
      decoded = model.decode(posterior.mean).sample
    out[f"{name}/keys"] = np.asarray(keys)
    out[f"{name}/shapes"] = np.asarray([",".join(str(d) for d in shape) for shape in shapes])
    out[f"{name}/x11"] = x
    out[f"{name}/mean"] = posterior.mean.numpy()
    out[f"{name}/logvar"] = posterior.logvar.numpy()
    out[f"{name}/decoded"] = decoded.numpy()
  np.savez_compressed(OUT, **out)
  print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
  main()
