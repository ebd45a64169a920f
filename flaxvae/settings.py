"""The config, resolved once at the top into frozen typed settings, one dataclass per section.

Users write ml_collections ConfigDicts (config files, `--config.key=value`, the config JSON a
checkpoint keeps): the ecosystem's convention. `resolve(config)` is the one crossing from
there into flaxvae: it maps every key to the field of the same name, runs the checks of
config.validate on the result, and each part of flaxvae then receives its own section
(`settings.optimizer` to the optimizer, `settings.eval` to evaluation, ...), never the whole
config, and cannot write into it.

The mapping is strict both ways: a key with no field (a typo in a config file, a key renamed
here) or a field with no key (a config not built on defaults.base_config()) is a ConfigError
when the config is resolved, never a setting that silently falls back to a default. A saved
config also carries the stamps of STAMPS; the keys it has that today's defaults lack were
dropped, with a warning, by config.with_defaults (a checkpoint cannot be edited). A variant
of a section is `dataclasses.replace`: `flaxvae evaluate --log_px_estimator=ais` evaluates
with a replaced eval section.
"""

import dataclasses
import difflib
import typing
from typing import Any

from flaxvae import config as config_lib
from flaxvae.errors import ConfigError

STAMPS = config_lib.STAMPS  # the keys only a saved config has; optional


@dataclasses.dataclass(frozen=True)
class ModelSettings:
  """config.model: the registered model's name and its own options, (key, value) pairs that
  are the model constructor's keyword arguments (models.model_options lists them)."""

  name: str
  options: tuple[tuple[str, Any], ...] = ()

  def kwargs(self):
    return dict(self.options)


@dataclasses.dataclass(frozen=True)
class ObjectiveSettings:
  name: str
  num_samples: int
  likelihood: str
  gaussian_logvar: float | None
  num_mixtures: int
  beta: float
  kl_warmup_steps: int
  free_bits: float
  free_bits_per: str
  perceptual_weight: float


@dataclasses.dataclass(frozen=True)
class DataSettings:
  name: str
  source_dir: str
  data_dir: str
  protocol: str
  train_split: str
  eval_split: str
  pipeline: str
  in_memory_max_bytes: int
  read_threads: int
  prefetch_batches: int


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
  name: str
  learning_rate: float
  schedule: str
  warmup_steps: int
  decay_start: int
  end_factor: float
  b1: float
  b2: float
  eps: float
  weight_decay: float
  grad_clip_norm: float
  accumulate_steps: int
  skip_nonfinite: bool
  skip_threshold: float
  adaptive_skip: float
  adaptive_skip_quantile: float
  adaptive_skip_window: int
  frozen: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class AdversarySettings:
  """config.adversary: the second player (a discriminator) of the latent autoencoder's GAN
  term, with its own optimizer (a section with the keys of `optimizer`)."""

  name: str
  num_layers: int
  width: int
  norm: str
  loss: str
  weight: float
  adaptive_weight: bool
  max_adaptive_weight: float
  start_step: int
  train_start: int
  lecam_weight: float
  lecam_decay: float
  r1_weight: float
  optimizer: OptimizerSettings

  @property
  def enabled(self):
    return self.name != "none"

  @property
  def first_training_step(self):
    """The step from which the discriminator trains (train_start, or start_step when < 0)."""
    return self.start_step if self.train_start < 0 else self.train_start


@dataclasses.dataclass(frozen=True)
class InitSettings:
  params_from: str
  param_groups: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ParallelSettings:
  backend: str
  num_devices: int
  mesh: str
  wait_timeout_s: float


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
  every_steps: int
  max_to_keep: int
  keep_best: int
  allow_config_change: bool


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  every_steps: int
  batch_size: int
  num_examples: int
  num_importance_samples: int
  final_num_importance_samples: int
  final_num_examples: int
  amortization_examples: int
  amortization_steps: int
  amortization_learning_rate: float
  num_image_samples: int
  log_px_estimator: str
  ais_steps: int
  ais_chains: int
  ais_leapfrog: int
  ais_examples: int
  ais_init: str
  bdmc_examples: int
  schedule: str
  log_points: int
  reconstruction_metrics: bool
  rfid_examples: int


@dataclasses.dataclass(frozen=True)
class Settings:
  """The whole config, typed: the top-level scalars and one section per part."""

  seed: int
  num_steps: int
  batch_size: int
  steps_per_dispatch: int
  scan_unroll: int
  dtype: str
  log_every_steps: int
  ema_decay: float
  max_consecutive_skips: int
  time_budget_s: float
  model: ModelSettings
  objective: ObjectiveSettings
  data: DataSettings
  optimizer: OptimizerSettings
  adversary: AdversarySettings
  init: InitSettings
  parallel: ParallelSettings
  checkpoint: CheckpointSettings
  eval: EvalSettings
  flaxvae_version: str | None = None  # STAMPS: only in a saved config
  image_shape: tuple[int, ...] | None = None


def resolve(config) -> Settings:
  """The checked, typed settings of a ConfigDict (a config file's, with any overrides, or a
  saved one read by config.with_defaults). Raises one ConfigError for the first problem."""
  settings = _section(Settings, config, "")
  config_lib.validate(settings)
  return settings


def of(config_or_settings) -> Settings:
  """Settings as they are; a ConfigDict resolved (what the public entry points accept)."""
  if isinstance(config_or_settings, Settings):
    return config_or_settings
  return resolve(config_or_settings)


def resolve_model(model_config) -> ModelSettings:
  """ModelSettings of a config.model section (a ConfigDict, e.g. defaults.model_config(...))."""
  if "name" not in model_config:
    raise ConfigError(
      "config key model.name is missing: build config.model with "
      "flaxvae.defaults.model_config(NAME)"
    )
  return ModelSettings(
    name=model_config["name"],
    options=tuple(
      (key, _frozen(model_config[key])) for key in model_config.keys() if key != "name"
    ),
  )


def unknown_key_message(key, known, where=""):
  """The one wording of an unknown dotted config `key` (config files, --config. overrides):
  the closest of the dotted keys `known`, and the keys of its section."""
  close = difflib.get_close_matches(key, known, n=3)
  section = key.rpartition(".")[0]
  siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == section]
  return (
    f"unknown config key {key!r}{where}: "
    + (f"did you mean {' or '.join(close)}? " if close else "")
    + f"keys {('under ' + section) if section else 'at the top'}: "
    + ", ".join(siblings)
  )


def _section(cls, node, prefix):
  """`cls` from the keys of `node`, field by field: none left over, none missing."""
  if not hasattr(node, "keys"):
    raise ConfigError(
      f"config key {prefix[:-1]} must be a section with keys, got {node!r}: "
      "build config files on flaxvae.defaults.base_config()"
    )
  fields = dataclasses.fields(cls)
  types = typing.get_type_hints(cls)  # classes even where annotations are strings
  names = [f.name for f in fields]
  for key in node.keys():
    if key not in names:
      known = [prefix + n for n in names if n not in STAMPS]
      raise ConfigError(unknown_key_message(prefix + key, known))
  values = {}
  for f in fields:
    if f.name not in node:
      if f.name in STAMPS:
        continue
      raise ConfigError(
        f"config key {prefix}{f.name} is missing: build config files on "
        "flaxvae.defaults.base_config(), which holds every key with its default"
      )
    value = node[f.name]
    if types[f.name] is ModelSettings:
      value = resolve_model(value)
    elif dataclasses.is_dataclass(types[f.name]):
      value = _section(types[f.name], value, f"{prefix}{f.name}.")
    values[f.name] = _frozen(value)
  return cls(**values)


def _frozen(value):
  """Lists (JSON's tuples) as tuples, all the way down: settings cannot change in place."""
  if isinstance(value, (list, tuple)):
    return tuple(_frozen(v) for v in value)
  return value
