"""LDM's kl-f8 autoencoder (the Stable Diffusion 1.x VAE's architecture) at 256x256, for users
with accelerators and the data: 4 latent channels at 1/8 the resolution, channels 128 with
multipliers 1,2,4,4, 2 ResNet blocks per level, attention in the middle block only,
L1 + LPIPS + KL 1e-6, a PatchGAN from step 50,001 (weight 0.5, adaptive), Adam (0.5, 0.9) at
4.5e-6 times the global batch as LDM's main.py scales it (LDM trained with batch 12).

Your images: `flaxvae prepare-data folder --source DIR --name imagenet256` (256x256 crops), and
the perceptual weights: `flaxvae weights prepare lpips_vgg16` (docs/weights.md).

    flaxvae train --config configs/imagenet256_kl_f8.py --workdir runs/kl_f8 \\
      --config.dtype=bfloat16
    flaxvae bench --aot --config configs/imagenet256_kl_f8.py --devices 8,64
    get_config("tiny"): the same structure shrunk to run two steps on a CPU (tests)
"""

from flaxvae import defaults


def get_config(arg=None):
  config = defaults.ldm_autoencoder_recipe(data="imagenet256", batch_size=12)
  return defaults.tiny_variant(config) if arg == "tiny" else config
