"""A residual conv VAE with sub-pixel upsampling on Fashion-MNIST, Bernoulli likelihood.

flaxvae train --config configs/fashion_mnist_conv.py --workdir runs/conv
"""

from flaxvae import defaults


def get_config(arg=None):
  config = defaults.base_config()
  config.model = defaults.model_config(
    "conv", latent_dim=16, channels=(32, 64), blocks_per_stage=1, activation="relu"
  )
  config.num_steps = 5_000
  # On XLA:CPU a rolled scan of conv steps is many times slower than one step per
  # dispatch; unrolling a few steps keeps most of the dispatch saving.
  config.steps_per_dispatch = 4
  config.scan_unroll = 4
  return config
