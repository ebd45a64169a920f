"""The classic MLP VAE with the PyTorch reference example's protocol, for side-by-side numbers.

784-400-20, Adam 1e-3, batch 128, and a Bernoulli likelihood on the grey levels in [0, 1]:
the same model and protocol as the PyTorch example, so the test "ELBO" compares directly
with its figure. Bernoulli on grey levels is not a probability model of the data, so
evaluation labels log p(x) and the ELBO for what they are (the negative binary cross-entropy)
and reports no NLL or bits/dim; configs/fashion_mnist_mlp.py is the same model on binarized
data, where they are likelihoods. (flaxvae 0.1's default: `make run` gave ELBO -240.79.)

    flaxvae train --config configs/fashion_mnist_mlp_pytorch.py --workdir runs/mlp_pytorch
"""
from flaxvae import defaults


def get_config(arg=None):
  config = defaults.base_config()
  config.model = defaults.model_config("mlp", latent_dim=20, hidden=(400,), activation="relu")
  config.data.protocol = "grey"
  config.num_steps = 24_000  # about 51 epochs at batch 128
  # The final evaluation (K=5000 importance samples over the 10,000 test images) is
  # most of `make run`; the amortization gap on 500 examples keeps it inside 10 minutes.
  config.eval.amortization_examples = 500
  config.steps_per_dispatch = 500  # a rolled lax.scan of steps (fastest for the MLP on CPU); divides every event interval
  config.scan_unroll = 1
  return config
