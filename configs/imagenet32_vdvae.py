"""VDVAE's ImageNet-32 model (3.80 bits/dim; about 119M parameters),
for users with accelerators and the data.

VDVAE's hyperparameters (openai/vdvae hps.py) through `defaults.vdvae_recipe`: width 512,
bottleneck 0.25, 16 latent channels per layer, a 10-component discretized mixture of logistics
on 8-bit data, AdamW (b2 0.9, weight decay 0.01) at 1.5e-4 after 100 warm-up steps, gradient clip
200 and skip 300 (per dimension, as VDVAE's), EMA 0.999, global batch 256.

    flaxvae train --config configs/imagenet32_vdvae.py --workdir runs/imagenet32_vdvae \
      --config.dtype=bfloat16
    flaxvae bench --aot --config configs/imagenet32_vdvae.py --devices 1,8  # memory first
    get_config("tiny"): the same structure shrunk to run two steps on a CPU (tests)
"""

from flaxvae import defaults


def get_config(arg=None):
  config = defaults.vdvae_recipe(
    data="imagenet32",
    dec_layers="1:2,4:5,8:10,16:20,32:41",
    enc_blocks="32:16,16:10,8:9,4:7,1:6",
    width=512,
    learning_rate=1.5e-4,
    grad_clip=200,
    skip_threshold=300,
    ema_decay=0.999,
    batch_size=256,
    dims=32 * 32 * 3,
  )
  return defaults.tiny_variant(config) if arg == "tiny" else config
