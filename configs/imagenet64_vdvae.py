"""VDVAE's ImageNet-64 model (3.52 bits/dim; about 125M parameters),
for users with accelerators and the data.

VDVAE's hyperparameters (openai/vdvae hps.py) through `defaults.vdvae_recipe`: width 512,
bottleneck 0.25, 16 latent channels per layer, a 10-component discretized mixture of logistics
on 8-bit data, AdamW (b2 0.9, weight decay 0.01) at 1.5e-4 after 100 warm-up steps, gradient clip
220 and skip 380 (per dimension, as VDVAE's), EMA 0.999, global batch 128.

    flaxvae train --config configs/imagenet64_vdvae.py --workdir runs/imagenet64_vdvae \
      --config.dtype=bfloat16
    flaxvae bench --aot --config configs/imagenet64_vdvae.py --devices 1,8  # memory first
    get_config("tiny"): the same structure shrunk to run two steps on a CPU (tests)
"""

from flaxvae import defaults


def get_config(arg=None):
  config = defaults.vdvae_recipe(
    data="imagenet64",
    dec_layers="1:2,4:4,8:8,16:16,32:32,64:13",
    enc_blocks="64:12,32:21,16:10,8:9,4:8,1:5",
    width=512,
    learning_rate=1.5e-4,
    grad_clip=220,
    skip_threshold=380,
    ema_decay=0.999,
    batch_size=128,
    dims=64 * 64 * 3,
  )
  return defaults.tiny_variant(config) if arg == "tiny" else config
