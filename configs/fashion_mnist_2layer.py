"""The IWAE paper's two-stochastic-layer MLP VAE on dynamically binarized Fashion-MNIST.

Burda, Grosse & Salakhutdinov (2016): 784-200-200-100 (z1) -100-100-50 (z2), tanh, Gaussian
conditionals, Bernoulli likelihood, Adam (b2 = 0.999, eps 1e-4), batch 20 in the paper; here
batch 100 and a shortened schedule (a learning rate of 1e-3 decayed by cosine) so a run fits
this machine. get_config("1") is their one-stochastic-layer model (784-200-200-50).

    flaxvae train --config configs/fashion_mnist_2layer.py --workdir runs/2layer
    flaxvae train --config configs/fashion_mnist_2layer.py:1 --workdir runs/1layer
    ... --config.objective.name=iwae --config.objective.num_samples=50   (the IWAE objective)
"""

from flaxvae import defaults


def get_config(arg=None):
  config = defaults.base_config()
  if arg == "1":
    model = dict(hidden=((200, 200),), latent_dims=(50,))
  else:
    model = dict(hidden=((200, 200), (100, 100)), latent_dims=(100, 50))
  config.model = defaults.model_config("ladder_mlp", activation="tanh", **model)
  config.data.protocol = "binarized"
  config.batch_size = 100
  config.num_steps = 30_000  # 50 epochs
  config.steps_per_dispatch = 500
  config.optimizer.learning_rate = 1e-3
  config.optimizer.eps = 1e-4
  config.optimizer.schedule = "warmup_cosine"
  config.optimizer.end_factor = 0.1
  config.eval.every_steps = 10_000
  config.eval.amortization_examples = 0
  config.checkpoint.every_steps = 10_000
  return config
