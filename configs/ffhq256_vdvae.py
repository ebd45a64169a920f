"""VDVAE's FFHQ-256 model (about 115M parameters; VDVAE trains it on 5-bit data, flaxvae on
8-bit), for users with accelerators and the data.

VDVAE's hyperparameters (openai/vdvae hps.py) through `defaults.vdvae_recipe`: width 512,
bottleneck 0.25, 16 latent channels per layer, a 10-component discretized mixture of logistics
on 8-bit data, AdamW (b2 0.9, weight decay 0.01) at 1.5e-4 after 100 warm-up steps, gradient clip
130 and skip 180 (per dimension, as VDVAE's), EMA 0.999, global batch 32.
The dataset is your own images: `flaxvae prepare-data folder --source DIR --name ffhq256`.

    flaxvae train --config configs/ffhq256_vdvae.py --workdir runs/ffhq256_vdvae \
      --config.dtype=bfloat16
    flaxvae bench --aot --config configs/ffhq256_vdvae.py --devices 1,8  # memory first
    get_config("tiny"): the same structure shrunk to run two steps on a CPU (tests)
"""

from flaxvae import defaults


def get_config(arg=None):
  config = defaults.vdvae_recipe(
    data="ffhq256",
    dec_layers="1:2,4:4,8:5,16:10,32:22,64:14,128:8,256:1",
    enc_blocks="256:4,128:9,64:13,32:18,16:8,8:6,4:6,1:4",
    width=512,
    learning_rate=1.5e-4,
    grad_clip=130,
    skip_threshold=180,
    ema_decay=0.999,
    batch_size=32,
    dims=256 * 256 * 3,
  )
  return defaults.tiny_variant(config) if arg == "tiny" else config
