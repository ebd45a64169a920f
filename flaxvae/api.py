"""The Python API for notebooks and scripts: a trained model from its workdir, and its data.

    model = flaxvae.load("runs/fashion_mnist_mlp")        # latest checkpoint, any device count
    x = flaxvae.load_dataset("runs/fashion_mnist_mlp", "test")[:100]
    log_px = model.log_marginal(x, jax.random.key(0), num_samples=5000)
    images = model.sample(jax.random.key(1), 16, temperature=0.8)

The model is rebuilt from the config saved in the checkpoint (so a later change to a config
file does not change what `load` returns), with the same pieces the trainer uses (`Run`),
on whatever devices this machine has. Evaluation uses the EMA parameters when the run kept
them.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from flaxvae import config as config_lib
from flaxvae.data import protocols, registry
from flaxvae.errors import CheckpointError, ConfigError, one_line
from flaxvae.eval import diagnostics, evaluation, sampling
from flaxvae.eval.evaluator import Evaluator
from flaxvae.models import contract
from flaxvae.models.noise import NoiseSource
from flaxvae.run import Run
from flaxvae.train import checkpoint as checkpoint_lib


def _checkpoint_manager(workdir):
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  if not os.path.isdir(directory):
    raise CheckpointError(
      f"no checkpoints in {directory}: train first "
      "(flaxvae train --config ... --workdir DIR) or check --workdir"
    )
  manager = checkpoint_lib.read_only_manager(directory)
  if manager.latest_step() is None:
    raise CheckpointError(
      f"no finished checkpoint in {directory}: train longer "
      "(checkpoint.every_steps) or check --workdir"
    )
  return manager


def _newest_readable(workdir, step, read):
  """(step, read(manager, step)) of the newest readable checkpoint (or of `step`), read-only:
  the trainer's fallback (checkpoint.newest_readable), so a run may be writing meanwhile."""
  manager = _checkpoint_manager(workdir)
  try:
    found, value, _ = checkpoint_lib.newest_readable(
      manager.directory, manager.all_steps(), lambda s: read(manager, s), step
    )
  finally:
    manager.close()
  return found, value


def _read_config(manager, step):
  saved = checkpoint_lib.restore_items(manager, step, config=ocp.args.JsonRestore())["config"]
  if not isinstance(saved, dict):
    raise ValueError(f"its config item holds {type(saved).__name__}, not a config")
  return saved


def saved_config_json(workdir, step=None):
  """The resolved config (JSON) saved with checkpoint `step` (default: the newest readable)."""
  return _newest_readable(workdir, step, _read_config)[1]


def saved_config(workdir, step=None):
  """The resolved config a checkpoint was trained with, on top of today's defaults."""
  return config_lib.with_defaults(saved_config_json(workdir, step))


def _image_shape(saved, config):
  """The trained image shape: stamped in the checkpoint (0.2+), else a registered dataset's."""
  if saved.get("image_shape"):
    return tuple(saved["image_shape"])
  if config.data.name in registry.DATASETS:
    return registry.DATASETS.get(config.data.name).image_shape
  return None  # a folder dataset of an old run: read from its evaluation split


class Model:
  """A trained VAE. Inputs `x` are preprocessed floats [batch, H, W, C] (see `load_dataset`);
  uint8 images go through the run's data protocol first. Per-example values are in nats."""

  def __init__(self, run, params, step, config=None):
    """`config`: the ConfigDict the run was loaded from (`model.config`, for users); the model
    itself reads only `run.settings`."""
    self.run, self.params, self.step = run, jax.tree.map(jnp.asarray, params), step
    self.config, self.settings, self.likelihood = config, run.settings, run.likelihood
    self.latent_shapes = run.model.latent_shapes
    self.capabilities = contract.capabilities(run.model)

    merge = run.model_with

    def bounds(params, x, key, num_samples):
      model = merge(params)
      keys = jax.random.split(key, x.shape[0])
      out = diagnostics.importance_pass(lambda noise: model.terms(x, noise), x, keys, num_samples)
      return out["iwae"], out["elbo"]

    self._bounds = jax.jit(bounds, static_argnums=3)
    self._ais = {}
    self._encode = jax.jit(lambda p, x: merge(p).encode(x))
    self._decode = jax.jit(lambda p, z: merge(p).decode(z))
    self._decode_image = jax.jit(lambda p, z: self.likelihood.mean(merge(p).decode(z)))
    self._log_joint = jax.jit(lambda p, x, zs: merge(p).log_joint(x, zs))
    self._log_prior = jax.jit(lambda p, zs: merge(p).log_prior(zs))

  def _x(self, x):
    x = np.asarray(x)
    if x.dtype == np.uint8:
      return protocols.eval_targets(jnp.asarray(x), jnp.arange(len(x)), self.run.protocol)
    return jnp.asarray(x, jnp.float32)

  def _require(self, capability, what):
    if capability not in self.capabilities:
      raise ConfigError(
        f"{what} needs a model with the {capability} capability; model "
        f"{self.settings.model.name!r} has {list(self.capabilities) or 'none'}"
      )

  def _require_any(self, capabilities, what):
    if not set(capabilities) & set(self.capabilities):
      self._require(capabilities[0], what)

  def encode(self, x):
    """The Gaussian posterior q(z|x) as (mean, logvar), each [batch, latent]; for a latent
    autoencoder (the reconstruction capability) [batch, h, w, c] each, x [batch, H, W, C] of
    any size its downsampling takes (odd ones pad as diffusers' AutoencoderKL does)."""
    self._require_any((contract.AGGREGATE_POSTERIOR, contract.RECONSTRUCTION), "encode")
    return self._encode(self.params, self._x(x))

  def decode(self, z):
    """The likelihood's raw parameters for latents z [n, latent]: [n, H, W, channels_out]. A
    latent autoencoder's (the reconstruction capability): the image [n, H, W, C] for latents
    [n, h, w, c], the likelihood's mean, in the value range of the images `encode` takes."""
    if contract.RECONSTRUCTION in self.capabilities:
      return self._decode_image(self.params, jnp.asarray(z, jnp.float32))
    self._require(contract.AGGREGATE_POSTERIOR, "decode")
    return self._decode(self.params, jnp.asarray(z, jnp.float32))

  def _latents(self, zs):
    """`zs` as the model's latents (a tuple, top layer first, float32 [batch, *shape] each); a
    one-layer model's may be its array alone. A one-line ConfigError when they do not fit."""
    zs = tuple(
      jnp.asarray(z, jnp.float32) for z in (zs if isinstance(zs, (tuple, list)) else (zs,))
    )
    shapes = [tuple(z.shape[1:]) for z in zs]
    if shapes != [tuple(s) for s in self.latent_shapes]:
      raise ConfigError(
        f"model {self.settings.model.name!r} takes latents of shapes "
        f"{[list(s) for s in self.latent_shapes]} (a tuple, top layer first, "
        f"each [batch, *shape]); got {[list(s) for s in shapes]}"
      )
    return zs

  def log_joint(self, x, zs):
    """log p(x, z) per example at given latents (a tuple, top layer first, [batch, *shape])."""
    return self._log_joint(self.params, self._x(x), self._latents(zs))

  def log_likelihood(self, x, z):
    """log p(x|z) summed over pixels, for a one-layer model: z [batch, latent] -> [batch]."""
    self._require(contract.AGGREGATE_POSTERIOR, "log_likelihood")
    return self.log_joint(x, z) - self.log_prior(z)

  def log_prior(self, zs):
    """log p(z) per example under the model's own prior, learned and hierarchical ones too:
    `zs` a tuple of latents, top layer first, [batch, *shape] each (a one-layer model also
    takes its array [batch, latent] alone)."""
    return self._log_prior(self.params, self._latents(zs))

  def sample(self, key, n, temperature=1.0):
    """n images [n, H, W, C] in [0, 1]: the mean of p(x|z) for z from the prior, whose
    standard deviations are scaled by `temperature` (one value, or one per layer, top first)."""
    return sampling.samples(self.run, self.params, key, n, temperature)

  def reconstruct(self, x, key, keep_layers=None):
    """Reconstructions keeping the top `keep_layers` layers from q(z|x) (None: all)."""
    model = self.run.model_with(self.params)
    keep = len(self.latent_shapes) if keep_layers is None else keep_layers
    sampling.check_keep_layers(keep, len(self.latent_shapes))
    return np.asarray(
      self.likelihood.mean(model.reconstruct(self._x(x), NoiseSource.from_key(key, len(x)), keep))
    )

  def elbo(self, x, key, num_samples=1):
    """The ELBO per example, estimated with `num_samples` posterior draws."""
    return self._bounds(self.params, self._x(x), key, int(num_samples))[1]

  def log_marginal(
    self, x, key, num_samples=5000, estimator="iwae", ais_steps=None, ais_leapfrog=None
  ):
    """log p(x) per example, both stochastic lower bounds: estimator "iwae", the
    importance-weighted bound with `num_samples` draws (Burda et al.); "ais", annealed
    importance sampling with `num_samples` chains per example over `ais_steps` steps (default
    eval.ais_steps), tighter where the posterior is multimodal or heavy-tailed."""
    x = self._x(x)
    if estimator == "iwae":
      return self._bounds(self.params, x, key, int(num_samples))[0]
    if estimator != "ais":
      raise ConfigError(f"unknown estimator {estimator!r}: use iwae or ais")
    c = self.settings.eval
    steps, leapfrog = int(ais_steps or c.ais_steps), int(ais_leapfrog or c.ais_leapfrog)
    setting = (steps, leapfrog, int(num_samples))
    if setting not in self._ais:
      merge = self.run.model_with
      self._ais[setting] = jax.jit(
        lambda p, x, keys: diagnostics.ais_log_px(
          merge(p), x, keys, steps, int(num_samples), leapfrog, c.ais_init
        )["log_px_ais"]
      )
    return self._ais[setting](self.params, x, jax.random.split(key, x.shape[0]))


def load(workdir, step=None) -> Model:
  """The model of `workdir` at checkpoint `step` (default: the newest readable one, with a
  warning for each newer one skipped), on this machine's devices."""
  runs = {}  # one Run per distinct saved config: falling back to an older step rebuilds none

  def read(manager, candidate):
    saved = _read_config(manager, candidate)
    key = json.dumps(saved, sort_keys=True)
    if key not in runs:
      config = config_lib.with_defaults(saved)
      runs[key] = config, Run(config, for_training=False, image_shape=_image_shape(saved, config))
    config, run = runs[key]
    target = checkpoint_lib.abstract_like(run.initial_state(), run.runner.sharding())
    try:
      return run, config, checkpoint_lib.restore_state(manager, candidate, target)
    except ValueError as e:  # orbax: the saved tree differs from this version's TrainState
      written_by = saved.get("flaxvae_version", "0.1.0")  # the one version that did not stamp
      if written_by == config_lib.version():
        raise  # the same version: the checkpoint is damaged, and the fallback says so
      raise CheckpointError(
        f"cannot read checkpoint step {candidate} in {manager.directory}: it was written by "
        f"flaxvae {written_by} and this is flaxvae {config_lib.version()} "
        f"({one_line(e, 120)}): retrain, or load it with flaxvae {written_by}"
      ) from None

  step, (run, config, state) = _newest_readable(workdir, step, read)
  params = jax.tree.map(np.asarray, run.eval_params(state))
  return Model(run, params, int(step), config)


def load_dataset(config_or_workdir, split):
  """The examples of `split` exactly as evaluation scores them: floats [N, H, W, C]."""
  config = (
    saved_config(config_or_workdir)
    if isinstance(config_or_workdir, (str, os.PathLike))
    else config_or_workdir
  )
  run = Run(config, for_training=False)
  images = run.dataset.images(split)
  prepare = jax.jit(lambda im, ids: protocols.eval_targets(im, ids, run.protocol))
  parts = [
    np.asarray(prepare(images[i : i + 10_000], np.arange(i, min(i + 10_000, len(images)))))
    for i in range(0, len(images), 10_000)
  ]
  return np.concatenate(parts)


def evaluate(
  workdir,
  split=None,
  num_importance_samples=None,
  max_examples=None,
  step=None,
  log_px_estimator=None,
  bdmc_examples=None,
):
  """`flaxvae evaluate`: the final evaluation of a checkpoint -> (row, path of its JSON file).

  The config's own final evaluation goes to eval.json; any other (fewer examples, another K,
  split or estimator) to its own file, so eval.json stays what `report` and `make run` rely on.
  """
  if num_importance_samples is not None and num_importance_samples <= 0:
    raise ConfigError(f"--num_importance_samples must be positive, got {num_importance_samples}")
  if max_examples is not None and max_examples < 0:
    raise ConfigError(f"--max_examples must be >= 0 (0: the whole split), got {max_examples}")
  model = load(workdir, step)
  run, settings = model.run, model.settings
  adhoc = {}  # what differs from the run's eval settings, which stay as they are
  if log_px_estimator and log_px_estimator != settings.eval.log_px_estimator:
    adhoc["estimator"] = log_px_estimator
  if bdmc_examples is not None and bdmc_examples != settings.eval.bdmc_examples:
    adhoc["bdmc"] = bdmc_examples
  eval_settings = dataclasses.replace(
    settings.eval,
    log_px_estimator=adhoc.get("estimator", settings.eval.log_px_estimator),
    bdmc_examples=adhoc.get("bdmc", settings.eval.bdmc_examples),
  )
  eval_split = settings.data.eval_split
  split = split or eval_split
  images = run.eval_images if split == eval_split else run.dataset.images(split)
  evaluator = Evaluator(run.runner, images, eval_settings.batch_size)
  n, k = evaluation.final_settings(eval_settings, max_examples, num_importance_samples)
  row = evaluation.final_evaluation(
    run, evaluator, model.params, evaluation.eval_rng(settings.seed), (n, k), eval_settings
  )
  row = dict(row, step=model.step, split=split)
  name = evaluation.result_file(eval_settings, eval_split, split, n, k)
  if adhoc:
    name = name if name != evaluation.FINAL_FILE else f"eval_{split}_K{k}_N{n or 'all'}.json"
    name = name.replace(
      ".json", "".join(f"_{key}{value}" for key, value in adhoc.items()) + ".json"
    )
  return row, evaluation.write_json(workdir, name, row)


def import_weights(source, workdir, **options):
  """`flaxvae import-weights`: diffusers' AutoencoderKL (a folder with config.json and the
  safetensors, or the file) or LDM's first-stage checkpoint -> a run directory `workdir` that
  `load`, `evaluate`, `sample`, latent-stats and init.params_from read. `options`: data,
  image_size, config (a ConfigDict to build on), norm_groups (interop/runs.py)."""
  from flaxvae.interop import runs  # noqa: PLC0415

  return runs.import_weights(source, workdir, **options)


def export_weights(workdir, dest, step=None):
  """`flaxvae export-weights`: a latent autoencoder's weights in diffusers' layout (config.json
  + diffusion_pytorch_model.safetensors in `dest`, with its scaling and shift factors)."""
  from flaxvae.interop import runs  # noqa: PLC0415

  return runs.export_weights(workdir, dest, step)
