"""VDVAE's CIFAR-10 model (Child 2021: 2.87 bits/dim; about 39M parameters),
for users with accelerators and the data.

VDVAE's hyperparameters (openai/vdvae hps.py) through `defaults.vdvae_recipe`: width 384,
bottleneck 0.25, 16 latent channels per layer, a 10-component discretized mixture of logistics
on 8-bit data, AdamW (b2 0.9, weight decay 0.01) at 2e-4 after 100 warm-up steps, gradient clip
200 and skip 400 (per dimension, as VDVAE's), EMA 0.9999, global batch 32.

    flaxvae train --config configs/cifar10_vdvae.py --workdir runs/cifar10_vdvae \
      --config.dtype=bfloat16
    flaxvae bench --aot --config configs/cifar10_vdvae.py --devices 1,8  # memory first
    get_config("tiny"): the same structure shrunk to run two steps on a CPU (tests)
"""

from flaxvae import defaults


def get_config(arg=None):
  config = defaults.vdvae_recipe(
    data="cifar10",
    dec_layers="1:1,4:3,8:6,16:11,32:22",
    enc_blocks="32:12,16:7,8:7,4:4,1:3",
    width=384,
    learning_rate=2e-4,
    grad_clip=200,
    skip_threshold=400,
    ema_decay=0.9999,
    batch_size=32,
    dims=32 * 32 * 3,
  )
  return defaults.tiny_variant(config) if arg == "tiny" else config
