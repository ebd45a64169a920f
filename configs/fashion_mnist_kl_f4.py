"""A latent autoencoder (LDM's KL autoencoder, 4x downsampling) on Fashion-MNIST, sized to
train on a 2-core CPU in about 30 minutes: 28x28 images padded to 32x32 inside the model,
4 latent channels at 8x8, channels 32 with multipliers 1,2,2, one ResNet block per level,
attention in the middle block; LDM's loss (configs/imagenet256_kl_f8.py) with a 2-layer
PatchGAN of width 32.

Variants, trained for the same wall time (time_budget_s) in docs/autoencoders.md:
    get_config()         L1 + KL + LPIPS + GAN (LDM's recipe)
    get_config("lpips")  L1 + KL + LPIPS
    get_config("l1")     L1 + KL
    get_config("tiny")   the same structure shrunk to run two steps on a CPU (tests)

    flaxvae weights prepare lpips_vgg16
    flaxvae train --config configs/fashion_mnist_kl_f4.py --workdir runs/kl_f4
"""

from flaxvae import defaults


def get_config(arg=None):
  config = defaults.ldm_autoencoder_recipe(
    data="fashion_mnist",
    batch_size=32,
    channels=32,
    channel_multipliers=(1, 2, 2),
    num_res_blocks=1,
    discriminator_start=150,
    # LDM's 4.5e-6 per example is sized for 250k steps; a 30-minute CPU run takes a few hundred
    base_learning_rate=1.5e-5,
  )
  config.model.pad_to = 32
  config.adversary.num_layers, config.adversary.width = 2, 32
  # The discriminator trains for 100 steps before its loss reaches the autoencoder: switched on
  # untrained at step 150 (LDM's train_start = start_step), it stalled the reconstruction of a
  # run this short (docs/autoencoders.md, "Quality")
  config.adversary.train_start = 50
  config.num_steps = 100_000
  config.time_budget_s = 1_800.0
  config.log_every_steps = 100
  # One step per dispatch: a step takes about a second here, so dispatching costs nothing, and
  # unrolled steps would multiply a compile that already takes minutes on XLA:CPU
  config.steps_per_dispatch = config.scan_unroll = 1
  config.checkpoint.every_steps = 1_000
  config.eval.every_steps = 0
  config.eval.batch_size = 500
  # CPU budget: the first 2,000 test images, rFID on the first 500 (Inception is slow here)
  config.eval.final_num_examples = 2_000
  config.eval.rfid_examples = 500
  if arg in ("lpips", "l1"):
    config.adversary = defaults.adversary_config()
  if arg == "l1":
    config.objective.perceptual_weight = 0.0
  return defaults.tiny_variant(config) if arg == "tiny" else config
