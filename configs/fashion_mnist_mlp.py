"""The default: the classic MLP VAE (784-400-20, Adam 1e-3, batch 128) on binarized Fashion-MNIST.

The `binarized` protocol (Burda et al. 2016): every training step draws binary images
x ~ Bernoulli(grey level), the test set is binarized once with a fixed seed, and the
Bernoulli likelihood is then a probability model of the data, so log p(x) is a
log-likelihood comparable with published binarized-MNIST-style figures. Evaluations run at
log-spaced steps from step 0 (eval.schedule "log"), so `flaxvae report` shows how the KL to
the prior and the KL to the posterior move from the start. configs/fashion_mnist_mlp_pytorch.py
keeps the PyTorch example's protocol for side-by-side numbers.

    flaxvae train --config configs/fashion_mnist_mlp.py --workdir runs/mlp
"""

from flaxvae import defaults


def get_config(arg=None):
  config = defaults.base_config()
  config.model = defaults.model_config("mlp", latent_dim=20, hidden=(400,), activation="relu")
  config.data.protocol = "binarized"
  config.eval.schedule = "log"
  config.num_steps = 24_000  # about 51 epochs at batch 128
  # The final evaluation (K=5000 importance samples over the 10,000 test images) is
  # most of `make run`; the amortization gap on 500 examples, not the default 1,000, keeps it
  # from growing further.
  config.eval.amortization_examples = 500
  config.steps_per_dispatch = (
    500  # a rolled lax.scan of steps (fastest for the MLP on CPU); divides every event interval
  )
  config.scan_unroll = 1
  return config
