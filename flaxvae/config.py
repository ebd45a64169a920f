"""The config, checked once at the top before anything is read or written.

`validate(settings)` raises one ConfigError naming the first problem and what to do instead;
settings.resolve runs it on the typed settings of a ConfigDict. `migrate(saved)` turns a
config written by an earlier flaxvae into today's keys, so old checkpoints load;
`with_defaults` reads it as a ConfigDict, which settings.resolve then resolves.

A saved config cannot be edited (it is part of a checkpoint), so `with_defaults` drops, with
one warning, the keys today's defaults lack (a typo an earlier flaxvae accepted, a setting since
removed) instead of refusing the checkpoint; config files and overrides stay strict.
"""

import dataclasses
import functools
import importlib.metadata
import json
import logging

import jax.numpy as jnp
import ml_collections

from flaxvae import defaults, models
from flaxvae.data import protocols
from flaxvae.errors import ConfigError
from flaxvae.models import contract
from flaxvae.objectives import likelihoods
from flaxvae.runtime import parallel
from flaxvae.train import optimizer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
OBJECTIVES = ("elbo", "iwae")
FREE_BITS_GROUPS = ("unit", "layer")
# data.binarization (flaxvae 0.1) became data.protocol.
BINARIZATION_TO_PROTOCOL = {"none": "grey", "dynamic": "binarized", "static": "static_binarized"}
# Keys only a saved config has (checkpoints, config.json): the version that wrote it and the
# image shape it trained on. Optional: a config file has neither.
STAMPS = ("flaxvae_version", "image_shape")

log = logging.getLogger("flaxvae")


def likelihood_of(objective):
  """The likelihood `objective` (settings.ObjectiveSettings) names, with the options that
  family takes."""
  o = objective
  options = {
    "gaussian": dict(gaussian_logvar=o.gaussian_logvar),
    "mixture_logistic": dict(num_mixtures=o.num_mixtures),
  }.get(o.likelihood, {})
  try:
    return likelihoods.get_likelihood(o.likelihood, **options)
  except ValueError as e:
    raise ConfigError(f"objective.likelihood: {e}") from None


def validate(settings):
  """Fails fast, before anything is read or written, on settings that cannot work.

  `settings`: settings.Settings (settings.resolve calls this on what it resolved)."""
  for key in ("num_steps", "batch_size", "steps_per_dispatch", "scan_unroll", "log_every_steps"):
    if getattr(settings, key) <= 0:
      raise ConfigError(f"{key} must be positive, got {getattr(settings, key)}")
  for key in (
    "checkpoint.every_steps",
    "eval.every_steps",
    "max_consecutive_skips",
    "time_budget_s",
  ):
    value = functools.reduce(getattr, key.split("."), settings)
    if value < 0:
      raise ConfigError(f"{key} must be >= 0 (0: off), got {value}")
  if settings.dtype == "float16":
    raise ConfigError(
      "dtype float16 needs loss scaling, which flaxvae does not do: use bfloat16 "
      "(same memory, float32's range) or float32"
    )
  if settings.dtype not in DTYPES:
    raise ConfigError(f"unknown dtype {settings.dtype!r}: choose one of {', '.join(DTYPES)}")
  _validate_objective(settings.objective)
  protocols.PROTOCOLS.get(settings.data.protocol)
  likelihood_of(settings.objective)
  models.check_config(settings.model)
  _validate_eval(settings.eval)
  optimizer.create_optimizer(settings.optimizer, settings.num_steps)
  _validate_adversary(settings)
  if settings.parallel.backend not in parallel.BACKENDS:
    raise ConfigError(
      f"unknown parallel.backend {settings.parallel.backend!r}: use "
      f"{' or '.join(parallel.BACKENDS)}"
    )
  accumulate = settings.optimizer.accumulate_steps
  if accumulate <= 0:
    raise ConfigError(f"optimizer.accumulate_steps must be positive, got {accumulate}")
  if accumulate > 1 and settings.objective.free_bits:
    raise ConfigError(
      "objective.free_bits floors the batch mean of the KL, which microbatches "
      "would change: use optimizer.accumulate_steps=1 with free bits"
    )
  if "fsdp" in settings.parallel.mesh and settings.optimizer.name == "lamb":
    raise ConfigError(
      "lamb scales each parameter by its own norm, which a slice cannot know: "
      "use adam, adamw or adamax with an fsdp mesh"
    )
  if settings.parallel.wait_timeout_s <= 0:
    raise ConfigError(
      f"parallel.wait_timeout_s must be positive, got {settings.parallel.wait_timeout_s}"
    )


def _validate_objective(o):
  if o.name not in OBJECTIVES:
    raise ConfigError(f"unknown objective.name {o.name!r}: use elbo or iwae")
  if o.num_samples <= 0:
    raise ConfigError(f"objective.num_samples must be positive, got {o.num_samples}")
  if o.free_bits < 0:
    raise ConfigError(f"objective.free_bits must be >= 0, got {o.free_bits}")
  if o.free_bits_per not in FREE_BITS_GROUPS:
    raise ConfigError(f"unknown objective.free_bits_per {o.free_bits_per!r}: use unit or layer")
  if o.name == "iwae":
    ignored = [
      f"{k}={getattr(o, k)}"
      for k, default in (("beta", 1.0), ("kl_warmup_steps", 0), ("free_bits", 0.0))
      if getattr(o, k) != default
    ]
    if ignored:
      raise ConfigError(
        f"objective.name=iwae has no KL term, so {', '.join(ignored)} would be "
        "ignored: use objective.name=elbo with them (num_samples k gives the "
        "k-sample ELBO), or drop them"
      )


ADVERSARY_NAMES = ("none", "patchgan")
ADVERSARY_CHOICES = {"norm": ("batch", "group", "none"), "loss": ("hinge", "non_saturating")}


def _validate_adversary(settings):
  """The perceptual and adversarial terms: settings that cannot work, or would be ignored."""
  a, o = settings.adversary, settings.objective
  if a.name not in ADVERSARY_NAMES:
    raise ConfigError(f"unknown adversary.name {a.name!r}: use {' or '.join(ADVERSARY_NAMES)}")
  if not a.enabled:
    default = defaults.adversary_config()
    given = {**dataclasses.asdict(a), "optimizer": dataclasses.asdict(a.optimizer)}
    wanted = json.loads(default.to_json())
    changed = [k for k in wanted if k != "name" and json.loads(json.dumps(given[k])) != wanted[k]]
    if changed:
      raise ConfigError(
        f"adversary.{changed[0]} is set but adversary.name is 'none', so it would be "
        "ignored: set adversary.name=patchgan to train a discriminator, or drop it"
      )
  if o.perceptual_weight < 0:
    raise ConfigError(f"objective.perceptual_weight must be >= 0, got {o.perceptual_weight}")
  if not (a.enabled or o.perceptual_weight):
    return
  what = "adversary.name=patchgan" if a.enabled else "objective.perceptual_weight"
  if not contract.has(models.MODELS.get(settings.model.name), contract.RECONSTRUCTION):
    raise ConfigError(
      f"{what} needs a model that gives its reconstruction (the reconstruction capability, "
      f"e.g. autoencoder_kl); model {settings.model.name!r} does not"
    )
  if o.name != "elbo" or o.num_samples != 1:
    raise ConfigError(
      f"{what} trains on one posterior sample per example: use objective.name=elbo with "
      "objective.num_samples=1"
    )
  if o.free_bits:
    raise ConfigError(f"{what} does not combine with objective.free_bits: set it to 0")
  if not a.enabled:
    return
  for key, choices in ADVERSARY_CHOICES.items():
    if getattr(a, key) not in choices:
      raise ConfigError(f"unknown adversary.{key} {getattr(a, key)!r}: use {' or '.join(choices)}")
  for key in ("num_layers", "width"):
    if getattr(a, key) <= 0:
      raise ConfigError(f"adversary.{key} must be positive, got {getattr(a, key)}")
  for key in ("weight", "max_adaptive_weight", "start_step", "lecam_weight", "r1_weight"):
    if getattr(a, key) < 0:
      raise ConfigError(f"adversary.{key} must be >= 0, got {getattr(a, key)}")
  if not 0 <= a.lecam_decay < 1:
    raise ConfigError(f"adversary.lecam_decay must be in [0, 1), got {a.lecam_decay}")
  if a.optimizer.accumulate_steps != 1:
    raise ConfigError(
      "adversary.optimizer.accumulate_steps must be 1: the discriminator takes one step on "
      "each batch (optimizer.accumulate_steps splits both players' batches)"
    )
  if a.optimizer.frozen:
    raise ConfigError(
      "adversary.optimizer.frozen is not supported: freeze the discriminator by setting "
      "adversary.train_start past num_steps"
    )
  if settings.optimizer.accumulate_steps > 1:
    raise ConfigError(
      "optimizer.accumulate_steps > 1 with a discriminator is not supported (its adaptive "
      "weight and BatchNorm statistics are of the whole batch): use accumulate_steps=1"
    )
  optimizer.create_optimizer(a.optimizer, settings.num_steps)


def _validate_eval(c):
  value = lambda key: getattr(c, key)
  for key in ("batch_size", "num_importance_samples", "final_num_importance_samples"):
    if value(key) <= 0:
      raise ConfigError(f"eval.{key} must be positive, got {value(key)}")
  for key in ("num_examples", "final_num_examples", "amortization_examples", "amortization_steps"):
    if value(key) < 0:
      raise ConfigError(
        f"eval.{key} must be >= 0 (0: {'all' if 'num_' in key else 'off'}), got {value(key)}"
      )
  for key, choices in (
    ("log_px_estimator", ("iwae", "ais")),
    ("ais_init", ("auto", "posterior", "prior")),
    ("schedule", ("every", "log")),
  ):
    if value(key) not in choices:
      raise ConfigError(f"unknown eval.{key} {value(key)!r}: use {' or '.join(choices)}")
  for key in ("ais_steps", "ais_chains", "ais_leapfrog", "log_points"):
    if value(key) <= 0:
      raise ConfigError(f"eval.{key} must be positive, got {value(key)}")
  for key in ("ais_examples", "bdmc_examples", "rfid_examples"):
    if value(key) < 0:
      raise ConfigError(f"eval.{key} must be >= 0, got {value(key)}")
  if c.amortization_learning_rate <= 0:
    raise ConfigError(
      f"eval.amortization_learning_rate must be positive, got {c.amortization_learning_rate}"
    )


def migrate(saved: dict) -> dict:
  """A saved config (JSON) with keys of earlier flaxvae versions renamed to today's."""
  saved = {k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()}
  saved.setdefault("flaxvae_version", "0.1.0")  # the only version that did not stamp it
  data = saved.get("data", {})
  if "binarization" in data:
    data.setdefault("protocol", BINARIZATION_TO_PROTOCOL.get(data["binarization"], "grey"))
    del data["binarization"]
  return saved


def with_defaults(saved: dict):
  """A saved config (JSON, any flaxvae version) as a ConfigDict on top of today's defaults.
  Keys the defaults lack are dropped with one warning naming them (see the module docstring)."""
  saved = migrate(saved)
  config = defaults.base_config()
  model_name = saved.get("model", {}).get("name", config.model.name)
  dropped = []
  with config.unlocked():
    config.model = defaults.model_config(model_name)

    def merge(target, values, prefix):
      for key, value in values.items():
        if key not in target and not (prefix == "" and key in STAMPS):
          dropped.append(prefix + key)
        elif isinstance(value, dict) and isinstance(target.get(key), ml_collections.ConfigDict):
          merge(target[key], value, f"{prefix}{key}.")
        else:
          target[key] = tuple(value) if isinstance(value, list) else value

    merge(config, saved, "")
  if dropped:
    log.warning(
      "the saved config has keys this flaxvae does not know, ignored: %s", ", ".join(dropped)
    )
  return config


def to_json(config) -> dict:
  """The config as plain JSON data, stamped with the flaxvae version (what checkpoints keep)."""
  resolved = json.loads(config.to_json_best_effort())
  resolved["flaxvae_version"] = version()
  return resolved


def version():
  try:
    return importlib.metadata.version("flaxvae")
  except importlib.metadata.PackageNotFoundError:
    return "unknown"
