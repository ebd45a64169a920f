"""The Python API for notebooks and scripts: a trained model from its workdir, and its data.

    model = flaxvae.load("runs/fashion_mnist_mlp")        # latest checkpoint
    x = flaxvae.load_dataset("runs/fashion_mnist_mlp", "test")[:100]
    mean, logvar = model.encode(x)
    log_px = model.log_marginal(x, jax.random.key(0), num_samples=5000)

The model is rebuilt from the config saved in the checkpoint (so a later change
to a config file does not change what `load` returns), with the same pieces the
trainer uses (`train.Run`). Evaluation uses the EMA parameters when the run kept them.
"""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from flaxvae import defaults, diagnostics, losses
from flaxvae import step as step_lib
from flaxvae.errors import ConfigError


def _checkpoint_manager(workdir):
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  if not os.path.isdir(directory):
    raise ConfigError(f"no checkpoints in {directory}: train first "
                      "(flaxvae train --config ... --workdir DIR) or check --workdir")
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      create=False, read_only=True))
  if manager.latest_step() is None:
    raise ConfigError(f"no finished checkpoint in {directory}: train longer "
                      "(checkpoint.every_steps) or check --workdir")
  return manager


def _chosen_step(manager, step):
  if step is None:
    return manager.latest_step()
  if step not in manager.all_steps():
    raise ConfigError(f"no checkpoint for step {step} in {manager.directory}: "
                      f"available steps are {sorted(manager.all_steps())}")
  return step


def saved_config(workdir, step=None):
  """The resolved config a checkpoint was trained with, on top of today's defaults."""
  manager = _checkpoint_manager(workdir)
  step = _chosen_step(manager, step)
  saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  manager.close()
  return _with_defaults(saved)


def _with_defaults(saved: dict):
  config = defaults.base_config()

  def merge(target, values):
    for key, value in values.items():
      if isinstance(value, dict) and key in target and isinstance(target[key],
                                                                  ml_collections.ConfigDict):
        merge(target[key], value)
      else:
        target[key] = tuple(value) if isinstance(value, list) else value
  with config.unlocked():
    merge(config, saved)
  return config


class Model:
  """A trained VAE. Inputs `x` are preprocessed floats [batch, H, W, C] (see `load_dataset`);
  uint8 images are scaled to [0, 1]. Every method returns per-example values in nats."""

  def __init__(self, run, params, step):
    self.run, self.params, self.step = run, params, step
    self.config, self.likelihood = run.config, run.likelihood
    self.latent_dim = run.config.model.latent_dim
    graphdef = run.graphdef

    def model(params):
      return nnx.merge(graphdef, params)
    likelihood = self.likelihood

    def log_likelihood(params, x, z):
      raw = model(params).decode(z.reshape(-1, z.shape[-1]))
      raw = raw.reshape(*z.shape[:-1], *x.shape[1:], likelihood.num_params)
      return jnp.sum(likelihood.log_prob(raw, x), axis=tuple(range(z.ndim - 1, raw.ndim - 1)))

    def bounds(params, x, key, num_samples):
      m = model(params)
      mean, logvar = m.encode(x)
      keys = jax.random.split(key, x.shape[0])
      return diagnostics.importance_bounds(m.decode, likelihood, x, mean, logvar, keys, num_samples)

    self._encode = jax.jit(lambda p, x: model(p).encode(x))
    self._decode = jax.jit(lambda p, z: model(p).decode(z))
    self._log_likelihood = jax.jit(log_likelihood)
    self._bounds = jax.jit(bounds, static_argnums=3)

  def _x(self, x):
    x = np.asarray(x)
    return jnp.asarray(x / 255.0 if x.dtype == np.uint8 else x, jnp.float32)

  def encode(self, x):
    """The posterior q(z|x) as (mean, logvar), each [batch, latent]."""
    return self._encode(self.params, self._x(x))

  def decode(self, z):
    """The likelihood's raw parameters for latents z [n, latent]: [n, H, W, C, num_params]
    (Bernoulli logits, Gaussian mean and log-variance, ...)."""
    return self._decode(self.params, jnp.asarray(z, jnp.float32))

  def log_likelihood(self, x, z):
    """log p(x|z) summed over pixels: z [batch, latent] -> [batch]; [k, batch, latent] -> [k, batch]."""
    return self._log_likelihood(self.params, self._x(x), jnp.asarray(z, jnp.float32))

  def log_prior(self, z):
    """log N(z; 0, I) per latent vector."""
    return losses.log_standard_normal(jnp.asarray(z, jnp.float32))

  def sample(self, key, n):
    """n images from the model: z ~ p(z), then the mean of p(x|z) (what the image grids show)."""
    z = jax.random.normal(key, (n, self.latent_dim))
    return self.likelihood.mean(self.decode(z))

  def elbo(self, x, key, num_samples=1):
    """The ELBO per example, estimated with `num_samples` posterior draws."""
    return self._bounds(self.params, self._x(x), key, int(num_samples))[1]

  def log_marginal(self, x, key, num_samples=5000):
    """log p(x) per example: the importance-weighted bound with `num_samples` draws (Burda et al.)."""
    return self._bounds(self.params, self._x(x), key, int(num_samples))[0]


def load(workdir, step=None) -> Model:
  """The model of `workdir` at checkpoint `step` (default: the latest)."""
  from flaxvae import checkpoint as checkpoint_lib, train
  config = saved_config(workdir, step)
  run = train.Run(config, need_train_split=False)
  checkpointer = checkpoint_lib.Checkpointer(workdir, config.checkpoint)
  step = _chosen_step(checkpointer.manager, step)
  target = checkpoint_lib.abstract_like(run.initial_state(), run.runner.sharding())
  try:
    state, _, _ = checkpointer.restore(step, target)
  except ValueError as e:  # orbax: the saved tree differs from this version's TrainState
    raise ConfigError(f"cannot read checkpoint step {step} in {checkpointer.directory} with this "
                      f"flaxvae version ({' '.join(str(e).split())[:120]}): retrain or use the "
                      "version that wrote it") from None
  finally:
    checkpointer.close()
  params = jax.tree.map(np.asarray, run.eval_params(state))
  return Model(run, params, int(step))


def load_dataset(config_or_workdir, split):
  """The examples of `split` exactly as evaluation scores them: floats [N, H, W, C].

  Grey levels are scaled to [0, 1]; static binarization thresholds them, and
  dynamic binarization uses the evaluation's own per-example draws.
  """
  from flaxvae import data as data_lib, evaluate
  config = (saved_config(config_or_workdir) if isinstance(config_or_workdir, (str, os.PathLike))
            else config_or_workdir)
  images = data_lib.load_images(config.data, split)
  rng = evaluate.eval_rng(config)

  @jax.jit
  def prepare(images, ids):
    return diagnostics.preprocessed(images, diagnostics.example_keys(rng, ids),
                                    config.data.binarization)

  parts = [np.asarray(prepare(images[i:i + 10_000], np.arange(i, min(i + 10_000, len(images)))))
           for i in range(0, len(images), 10_000)]
  return np.concatenate(parts)
