"""A run's pieces, assembled once from resolved settings: what the trainer, evaluation, the
API and the benchmarks all use, so they never assemble them differently.

A ConfigDict is resolved here (settings.resolve: checked once, typed, frozen); the run keeps
`run.settings` and hands each part its own section, never the ConfigDict.

    run = Run(config)                      # data from config.data, on disk
    run = Run(config, dataset=ArrayDataset({"train": x, "test": y}))   # arrays in memory
    run = Run(config, for_training=False)  # inference: any device count, no training split
    run = Run(config, abstract=True, image_shape=(32, 32, 3))  # shapes only: AOT compiles
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from flaxvae import config as config_lib
from flaxvae import data as data_lib
from flaxvae import models
from flaxvae import settings as settings_lib
from flaxvae import weights as weights_lib
from flaxvae.data import feeds, protocols
from flaxvae.errors import ConfigError
from flaxvae.objectives import perceptual
from flaxvae.runtime import parallel
from flaxvae.train import checkpoint, guards, optimizer, players
from flaxvae.train import step as step_lib


class Run:
  """Model (graphdef and initial params), likelihood, protocol, devices, data and optimizer."""

  def __init__(
    self, settings, dataset=None, *, for_training=True, image_shape=None, abstract=False
  ):
    """`settings`: settings.Settings, or a ConfigDict (resolved here)."""
    s = self.settings = settings_lib.of(settings)
    self.abstract = abstract
    if abstract:  # nothing is read or allocated: parameters are ShapeDtypeStructs
      for_training = False
      dataset = dataset or data_lib.ArrayDataset({})
    self.dataset = data_lib.open_dataset(s.data) if dataset is None else dataset
    self.likelihood = config_lib.likelihood_of(s.objective)
    self.protocol = protocols.PROTOCOLS.get(s.data.protocol)
    if for_training:
      self.runner = parallel.create_runner(s.parallel, s.batch_size)
      per_device = s.batch_size // self.runner.num_devices
      if per_device % s.optimizer.accumulate_steps:
        raise ConfigError(
          f"each device's {per_device} examples do not split into "
          f"optimizer.accumulate_steps={s.optimizer.accumulate_steps} "
          "microbatches: make batch_size / devices a multiple of it"
        )
      self.pipeline = data_lib.choose_pipeline(s.data, self.dataset, s.data.train_split)
    else:
      self.runner = parallel.inference_runner(s.parallel)
      self.pipeline = None
    self.train_images = self.train_split = None
    if self.pipeline == "in_memory":
      self.train_images = self.dataset.images(s.data.train_split)
      feeds.check_batch_size(
        s.batch_size, len(self.train_images), jax.process_count(), s.data.train_split
      )
    elif self.pipeline == "streaming":
      self.train_split = self.dataset.open_split(s.data.train_split)
      feeds.check_batch_size(
        s.batch_size, self.train_split.num_examples, jax.process_count(), s.data.train_split
      )
    self._eval_images = None
    if image_shape is None:
      image_shape = (
        self.train_images.shape[1:]
        if self.train_images is not None
        else self.train_split.image_shape
        if self.train_split is not None
        else self.eval_images.shape[1:]
      )
    self.image_shape = tuple(image_shape)
    self.model = models.create_model(
      s.model,
      image_shape=self.image_shape,
      likelihood=self.likelihood,
      seed=s.seed,
      dtype=config_lib.DTYPES[s.dtype],
      abstract=abstract,
    )
    self.graphdef, params = nnx.split(self.model)
    self.params = nnx.to_pure_dict(params)
    if s.init.params_from and not abstract:
      self.params = self._with_trained(self.params, s.init)
    self.tx, self.schedule = optimizer.create_optimizer(s.optimizer, s.num_steps)
    self.adversary, self.adversary_tx = None, None
    if s.adversary.enabled:  # the second player: built here, its step's graph per runner
      self.adversary_tx, _ = optimizer.create_optimizer(s.adversary.optimizer, s.num_steps)
      self.adversary = self._discriminator(axis_name=None)
    self.step_cfg = step_lib.step_config(s, self._adversary_step(self.runner))
    # LPIPS's weights, read now so a run without them stops before it writes anything
    self._constants = self._perceptual_weights() if for_training or abstract else None

  def _discriminator(self, axis_name):
    from flaxvae.models import discriminator  # noqa: PLC0415  (runs without one never need it)

    discriminator.check_image_size(self.settings.adversary, *self.image_shape[:2])
    build = lambda: discriminator.create_discriminator(
      self.settings.adversary,
      self.image_shape[-1],
      self.settings.seed,
      axis_name,
      config_lib.DTYPES[self.settings.dtype],
    )
    return nnx.eval_shape(build) if self.abstract or axis_name is not None else build()

  def _adversary_step(self, runner):
    """players.AdversaryStep for `runner`'s mesh: BatchNorm's moments are means over its batch
    axes, which the discriminator's graph names."""
    if self.adversary is None:
      return None
    from flaxvae.models import discriminator  # noqa: PLC0415

    graphdef = discriminator.split_discriminator(self._discriminator(runner.batch_axes))[0]
    return players.adversary_step(self.settings.adversary, graphdef, self.adversary_tx)

  @property
  def constants(self):
    """The frozen networks' weights the train step takes (LPIPS's), or None."""
    if self._constants is None:
      self._constants = self._perceptual_weights()
    return self._constants

  def _perceptual_weights(self):
    """LPIPS's weights (shapes only for an abstract run): a one-line WeightsMissing, before
    anything is written, when they are not prepared."""
    if not self.settings.objective.perceptual_weight:
      return None
    if self.abstract:
      shapes = {
        k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in perceptual.weight_shapes().items()
      }
      return perceptual.for_training(weights_lib.unflatten(shapes))
    return perceptual.for_training(perceptual.load_lpips_weights())

  @staticmethod
  def _with_trained(params, init):
    """`params` with the groups init.param_groups (all if empty) from a trained run (`init`:
    settings.InitSettings)."""
    trained = checkpoint.trained_params(init.params_from)
    groups = tuple(init.param_groups) or tuple(params)
    missing = [g for g in groups if g not in trained or g not in params]
    if missing:
      raise ConfigError(
        f"init.param_groups {missing} are not parameter groups of both this "
        f"model ({', '.join(params)}) and {init.params_from}"
      )
    shapes = lambda tree: jax.tree.map(lambda a: tuple(a.shape), tree)
    taken = {}
    for g in groups:
      group = _keyed_like(trained[g], params[g])
      if group is None or shapes(group) != shapes(params[g]):
        raise ConfigError(
          f"init: parameter group {g!r} of {init.params_from} has other shapes "
          "than this model's: use the same model config"
        )
      taken[g] = jax.tree.map(jnp.asarray, group)
    return {**params, **taken}

  @property
  def eval_images(self):
    """The evaluation split's uint8 images (read on first use)."""
    if self._eval_images is None:
      self._eval_images = self.dataset.images(self.settings.data.eval_split)
    return self._eval_images

  def initial_state(self):
    """The train state at step 0 (ShapeDtypeStructs when the run is abstract)."""
    if self.abstract:
      return jax.eval_shape(self._initial_state, self.params, self._adversary_variables())
    return self._initial_state(self.params, self._adversary_variables())

  def _adversary_variables(self):
    """The discriminator's (params, BatchNorm stats) as pure dicts, or None."""
    if self.adversary is None:
      return None
    return tuple(
      nnx.to_pure_dict(nnx.state(self.adversary, kind)) for kind in (nnx.Param, nnx.BatchStat)
    )

  def _initial_state(self, params, adversary_variables):
    c = self.settings
    return step_lib.TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=self.tx.init(params),
      ema_params=params if c.ema_decay else (),
      rng=jax.random.key_data(jax.random.key(c.seed)),
      skipped=jnp.zeros((), jnp.int32),
      consecutive_skips=jnp.zeros((), jnp.int32),
      guard=guards.init(c.optimizer.adaptive_skip, c.optimizer.adaptive_skip_window),
      adversary=()
      if adversary_variables is None
      else players.initial_adversary(
        *adversary_variables, self.adversary_tx, self.settings.adversary.optimizer
      ),
    )

  def eval_params(self, state):
    """The parameters evaluation uses: the EMA when the run keeps one."""
    return state.ema_params if self.settings.ema_decay else state.params

  def model_with(self, params):
    """The model with `params` (host or device arrays), for sampling and inspection."""
    return nnx.merge(self.graphdef, jax.tree.map(jnp.asarray, params))

  def train_fn(self, inputs="indices", runner=None):
    """The jitted train function the trainer dispatches (train/step.py builds it)."""
    runner = runner or self.runner
    step_cfg = self.step_cfg
    if runner is not self.runner and self.adversary is not None:
      step_cfg = dataclasses.replace(step_cfg, adversary=self._adversary_step(runner))
    return step_lib.build_train_fn(
      runner,
      self.graphdef,
      self.tx,
      step_cfg,
      self.settings.scan_unroll,
      self.initial_state(),
      inputs,
      self.constants,
    )

  def create_feed(self, data_state=None):
    """The feed of this run's training data, resumed at `data_state` if given."""
    if self.pipeline is None:
      raise ConfigError("this run was assembled for inference: it has no training feed")
    c = self.settings
    data = self.train_images if self.pipeline == "in_memory" else self.train_split
    return feeds.create_feed(
      data,
      self.runner,
      seed=c.seed,
      batch_size=c.batch_size,
      read_threads=c.data.read_threads,
      prefetch_batches=c.data.prefetch_batches,
      data_state=data_state,
    )


def _keyed_like(saved, like):
  """`saved` (a checkpoint's nested dict) with the keys of `like` (the model's pure dict), or
  None where they differ: a checkpoint spells a list layer's index "0" where the model has 0."""
  if not isinstance(like, dict):
    return None if isinstance(saved, dict) else saved
  if not isinstance(saved, dict) or len(saved) != len(like):
    return None
  out = {}
  for key, value in like.items():
    match = saved.get(key, saved.get(str(key)))
    out[key] = None if match is None else _keyed_like(match, value)
    if out[key] is None:
      return None
  return out
