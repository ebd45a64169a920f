"""The SD3 / FLUX.1 autoencoder layout: kl-f8 with 16 latent channels and no quant or
post-quant convolutions, LDM's loss and discriminator (configs/imagenet256_kl_f8.py), on your
256x256 images (`flaxvae prepare-data folder --source DIR --name imagenet256`).

    flaxvae train --config configs/kl_f8c16.py --workdir runs/kl_f8c16 --config.dtype=bfloat16
    get_config("tiny"): the same structure shrunk to run two steps on a CPU (tests)
"""

from flaxvae import defaults


def get_config(arg=None):
  config = defaults.ldm_autoencoder_recipe(
    data="imagenet256", batch_size=12, latent_channels=16, use_quant_conv=False
  )
  return defaults.tiny_variant(config) if arg == "tiny" else config
