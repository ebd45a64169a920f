"""The classic MLP VAE with the PyTorch reference example's protocol, for side-by-side numbers.

784-400-20, Adam 1e-3, batch 128, and a Bernoulli likelihood on the grey levels in [0, 1]:
the same model and protocol as the PyTorch example, so the test "ELBO" compares directly
with its figure. Bernoulli on grey levels is not a probability model of the data, so
evaluation labels log p(x) and the ELBO for what they are (the negative binary cross-entropy)
and reports no NLL or bits/dim; configs/fashion_mnist_mlp.py is the same model on binarized
data, where they are likelihoods. (This was flaxvae 0.1's default.)

    flaxvae train --config configs/fashion_mnist_mlp_pytorch.py --workdir runs/mlp_pytorch
"""

from flaxvae import defaults


def get_config(arg=None):
  config = defaults.sibling(__file__, "fashion_mnist_mlp.py")
  config.data.protocol = "grey"
  config.eval.schedule = "every"  # as flaxvae 0.1's default run
  return config
