"""The seed question as an experiment: a trained decoder frozen, a fresh encoder trained alone.

With the decoder (and so p(x) and p(z|x)) fixed, maximising the ELBO = log p(x) - KL(q(z|x) ||
p(z|x)) over the encoder is exactly minimising the KL to the posterior; the KL to the prior,
the other reading's term, is then free to do whatever the posterior needs. Evaluations at
log-spaced steps from step 0 show both distances over the encoder's training.

    flaxvae train --config configs/fashion_mnist_mlp.py --workdir runs/fashion_mnist_mlp
    flaxvae train --config configs/fashion_mnist_encoder_only.py:runs/fashion_mnist_mlp \
        --workdir runs/encoder_only
    flaxvae report --workdir runs/encoder_only     # report/kl_to_prior_and_posterior.png

get_config(ARG): ARG is the trained run's workdir (default runs/fashion_mnist_mlp); its
model config must be this one's (the default MLP).
"""

from flaxvae import defaults

DECODER = ("decoder", "to_output")


def get_config(arg=None):
  config = defaults.base_config()
  config.model = defaults.model_config("mlp", latent_dim=20, hidden=(400,), activation="relu")
  config.data.protocol = "binarized"
  config.init.params_from = arg or "runs/fashion_mnist_mlp"
  config.init.param_groups = DECODER  # the encoder starts from a fresh initialisation
  config.optimizer.frozen = DECODER
  config.num_steps = 6_000
  config.steps_per_dispatch = 500
  config.eval.schedule = "log"
  config.eval.log_points = 16
  config.eval.every_steps = 1_000
  config.eval.num_examples = 1_000
  config.eval.num_importance_samples = 500
  config.eval.final_num_importance_samples = 1_000
  config.eval.final_num_examples = 2_000
  config.eval.amortization_examples = 500
  config.checkpoint.every_steps = 0
  return config
