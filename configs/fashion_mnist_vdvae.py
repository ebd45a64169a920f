"""A small VDVAE-class hierarchical VAE for dynamically binarized Fashion-MNIST, sized to train
meaningfully on a 2-core CPU (the protocol of Burda et al.: a Bernoulli likelihood, the test
set binarized once with a fixed seed; its run and how it compares: docs/models.md).

28x28 padded to 32x32; 12 latent layers of 8 channels at resolutions 1, 4, 8, 16, 32 (2, 3, 4,
2, 1), widths 64 down to 16, bottleneck 0.5, ReLU; Adamax with warm-up and cosine decay, EMA,
KL warm-up, the adaptive gradient skip. Sized for XLA:CPU, where narrow convolutions at high
resolution are slow (their layout transposes and elementwise passes cost more than their
arithmetic) and SiLU's exponentials cost a large share of the step: most layers sit at 8x8 and 4x4.

    flaxvae train --config configs/fashion_mnist_vdvae.py --workdir runs/vdvae
    flaxvae sample --workdir runs/vdvae --temperature 0.8
    flaxvae sample --workdir runs/vdvae --keep_layers 0,1,2,5,9,12
"""

from flaxvae import defaults


def get_config(arg=None):
  config = defaults.base_config()
  config.model = defaults.model_config(
    "vdvae",
    dec_layers="1:2,4:3,8:4,16:2,32:1",
    enc_blocks="32:1,16:1,8:2,4:2,1:1",
    widths="32:16,16:32,8:64,4:64,1:64",
    bottleneck=0.5,
    latent_channels=8,
    pad_to=32,
    activation="relu",
  )
  config.data.protocol = "binarized"
  config.objective.likelihood = "bernoulli"
  config.objective.kl_warmup_steps = 2_000
  config.batch_size = 64
  config.num_steps = 6_000  # a CPU run's length; its result is in docs/models.md
  config.optimizer.name = "adamax"
  config.optimizer.learning_rate = 2e-3
  config.optimizer.schedule = "warmup_cosine"
  config.optimizer.warmup_steps = 200
  config.optimizer.end_factor = 0.05
  config.optimizer.adaptive_skip = 10.0
  config.ema_decay = 0.999
  # Convolutions in a rolled loop are slow on XLA:CPU: unrolled dispatches of a few steps.
  config.steps_per_dispatch = 2
  config.scan_unroll = 2
  config.log_every_steps = 500
  config.checkpoint.every_steps = 2_000
  config.eval.every_steps = 5_000
  config.eval.batch_size = 500
  config.eval.num_examples = 1_000
  config.eval.num_importance_samples = 20
  # The final log p(x): K = 100 on 1,000 test images (the default K = 5000 on all 10,000 would
  # take many times longer than the training on a CPU).
  config.eval.final_num_importance_samples = 100
  config.eval.final_num_examples = 1_000
  config.eval.amortization_examples = 0
  return defaults.tiny_variant(config) if arg == "tiny" else config
