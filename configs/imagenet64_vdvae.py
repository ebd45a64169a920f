"""VDVAE's ImageNet-64 model (3.52 bits/dim; about 125M parameters), for users with accelerators and the data.

Architecture and training as VDVAE's hyperparameters (openai/vdvae hps.py): width 512,
bottleneck 0.25, 16 latent channels per layer, a 10-component discretized mixture of logistics
on 8-bit data, AdamW (b2 = 0.9, weight decay 0.01) at 1.5e-4 after 100 warm-up steps, EMA 0.999,
global batch 128. VDVAE's loss is per dimension and flaxvae's per example (12288 dimensions),
so its gradient clip (220) and skip (380) thresholds are scaled by 12288 here.

    flaxvae train --config configs/imagenet64_vdvae.py --workdir runs/imagenet64_vdvae --config.dtype=bfloat16
    flaxvae bench --aot --config configs/imagenet64_vdvae.py --devices 1,8    # memory before you launch
    get_config("tiny"): the same structure shrunk to run two steps on a CPU (tests)
"""
from flaxvae import defaults

DIMS = 12288  # dimensions per example: VDVAE's thresholds are per dimension


def get_config(arg=None):
  config = defaults.base_config()
  config.model = defaults.model_config(
      "vdvae", dec_layers="1:2,4:4,8:8,16:16,32:32,64:13", enc_blocks="64:12,32:21,16:10,8:9,4:8,1:5", widths="512", bottleneck=0.25,
      latent_channels=16, pad_to=0, activation="gelu")
  config.data.name = "imagenet64"
  config.data.protocol = "8bit"
  config.objective.likelihood = "mixture_logistic"
  config.objective.num_mixtures = 10
  config.batch_size = 128
  config.num_steps = 1_000_000
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1.5e-4
  config.optimizer.b2 = 0.9
  config.optimizer.weight_decay = 0.01
  config.optimizer.schedule = "warmup_constant"
  config.optimizer.warmup_steps = 100
  config.optimizer.grad_clip_norm = 220 * DIMS
  config.optimizer.skip_threshold = 380 * DIMS
  config.ema_decay = 0.999
  config.log_every_steps = 100
  config.checkpoint.every_steps = 5_000
  config.eval.every_steps = 25_000
  config.eval.batch_size = 64
  config.eval.num_examples = 1_000
  config.eval.num_importance_samples = 10
  config.eval.final_num_importance_samples = 100
  config.eval.amortization_examples = 0
  return defaults.tiny_variant(config) if arg == "tiny" else config
