"""The default: the classic MLP VAE (784-400-20, Adam 1e-3, batch 128) on Fashion-MNIST.

Same model and protocol as the PyTorch reference example (Bernoulli likelihood
on the grey levels in [0, 1]), so the test ELBO compares directly.

    flaxvae train --config configs/fashion_mnist_mlp.py --workdir runs/mlp
"""
from flaxvae import defaults


def get_config(arg=None):
  config = defaults.base_config()
  config.model = defaults.model_config("mlp", latent_dim=20, hidden=(400,), activation="relu")
  config.num_steps = 24_000  # about 51 epochs at batch 128
  # The final evaluation (K=5000 importance samples over the 10,000 test images) is
  # most of `make run`; the amortization gap on 500 examples keeps it inside 10 minutes.
  config.eval.amortization_examples = 500
  config.steps_per_dispatch = 500  # a rolled lax.scan of steps (fastest for the MLP on CPU); divides every event interval
  config.scan_unroll = 1
  return config
