"""The small VDVAE-class model of fashion_mnist_vdvae.py on Fashion-MNIST's grey levels as 8-bit
data: a discretized mixture of logistics (PixelCNN++ / VDVAE's likelihood, 5 components) is a
probability mass over the 256 levels, so its NLL is reported in bits/dim.

    flaxvae train --config configs/fashion_mnist_vdvae_8bit.py --workdir runs/vdvae_8bit
"""

from flaxvae import defaults


def get_config(arg=None):
  config = defaults.sibling(__file__, "fashion_mnist_vdvae.py")
  config.data.protocol = "8bit"
  config.objective.likelihood = "mixture_logistic"
  config.objective.num_mixtures = 5
  return defaults.tiny_variant(config) if arg == "tiny" else config
