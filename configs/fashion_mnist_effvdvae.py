"""Efficient-VDVAE's own binarized-MNIST baseline architecture (egs/binarized_mnist_baseline.cfg),
on dynamically binarized Fashion-MNIST, so flaxvae can be put beside the anchor's code.

28x28 padded to 32x32; 23 top-down latent layers of 32 channels over resolutions 1, 4, 8, 16,
32 (5, 5, 10, 2, 1); blocks of widths 512/256/128/64/32 without a bottleneck (ratio 1.0);
SiLU; Adamax (1e-3, 100 warm-up steps, flat until 5k, cosine to 1e-4 by 200k); EMA 0.9999;
KL warm-up; batch 32. Differences from the anchor: one encoder activation per resolution
(VDVAE's wiring) instead of one skip per layer, no NVAE KL balancing, the adaptive gradient
skip instead of a fixed threshold (theirs is set for a per-dimension loss).

    flaxvae train --config configs/fashion_mnist_effvdvae.py --workdir runs/effvdvae
    flaxvae bench --config configs/fashion_mnist_effvdvae.py --cases default --steps 3
"""

from flaxvae import defaults


def get_config(arg=None):
  config = defaults.base_config()
  config.model = defaults.model_config(
    "vdvae",
    dec_layers="1:5,4:5,8:10,16:2,32:1",
    enc_blocks="32:1,16:2,8:10,4:5,1:5",
    widths="32:32,16:64,8:128,4:256,1:512",
    bottleneck=1.0,
    latent_channels=32,
    pad_to=32,
    activation="silu",
  )
  config.data.protocol = "binarized"
  config.objective.likelihood = "bernoulli"
  config.objective.kl_warmup_steps = 500
  config.batch_size = 32
  config.num_steps = 200_000
  config.optimizer.name = "adamax"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.schedule = "warmup_cosine"
  config.optimizer.warmup_steps = 100
  config.optimizer.decay_start = 5_000
  config.optimizer.end_factor = 0.1
  config.optimizer.weight_decay = 0.01
  config.optimizer.adaptive_skip = 10.0
  config.ema_decay = 0.9999
  config.steps_per_dispatch = 1
  config.log_every_steps = 100
  config.checkpoint.every_steps = 2_000
  config.eval.every_steps = 10_000
  config.eval.batch_size = 256
  config.eval.num_examples = 1_000
  config.eval.num_importance_samples = 10
  config.eval.final_num_importance_samples = 1_000
  config.eval.amortization_examples = 0
  return defaults.tiny_variant(config) if arg == "tiny" else config
