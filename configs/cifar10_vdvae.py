"""VDVAE's CIFAR-10 model (Child 2021: 2.87 bits/dim; about 39M parameters), for users with accelerators and the data.

Architecture and training as VDVAE's hyperparameters (openai/vdvae hps.py): width 384,
bottleneck 0.25, 16 latent channels per layer, a 10-component discretized mixture of logistics
on 8-bit data, AdamW (b2 = 0.9, weight decay 0.01) at 2e-4 after 100 warm-up steps, EMA 0.9999,
global batch 32. VDVAE's loss is per dimension and flaxvae's per example (3072 dimensions),
so its gradient clip (200) and skip (400) thresholds are scaled by 3072 here.

    flaxvae train --config configs/cifar10_vdvae.py --workdir runs/cifar10_vdvae --config.dtype=bfloat16
    flaxvae bench --aot --config configs/cifar10_vdvae.py --devices 1,8    # memory before you launch
    get_config("tiny"): the same structure shrunk to run two steps on a CPU (tests)
"""
from flaxvae import defaults

DIMS = 3072  # dimensions per example: VDVAE's thresholds are per dimension


def get_config(arg=None):
  config = defaults.base_config()
  config.model = defaults.model_config(
      "vdvae", dec_layers="1:1,4:3,8:6,16:11,32:22", enc_blocks="32:12,16:7,8:7,4:4,1:3", widths="384", bottleneck=0.25,
      latent_channels=16, pad_to=0, activation="gelu")
  config.data.name = "cifar10"
  config.data.protocol = "8bit"
  config.objective.likelihood = "mixture_logistic"
  config.objective.num_mixtures = 10
  config.batch_size = 32
  config.num_steps = 1_000_000
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 2e-4
  config.optimizer.b2 = 0.9
  config.optimizer.weight_decay = 0.01
  config.optimizer.schedule = "warmup_constant"
  config.optimizer.warmup_steps = 100
  config.optimizer.grad_clip_norm = 200 * DIMS
  config.optimizer.skip_threshold = 400 * DIMS
  config.ema_decay = 0.9999
  config.log_every_steps = 100
  config.checkpoint.every_steps = 5_000
  config.eval.every_steps = 25_000
  config.eval.batch_size = 64
  config.eval.num_examples = 1_000
  config.eval.num_importance_samples = 10
  config.eval.final_num_importance_samples = 100
  config.eval.amortization_examples = 0
  return defaults.tiny_variant(config) if arg == "tiny" else config
