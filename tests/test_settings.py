"""The config resolves into typed settings key for field, both ways: a key renamed on either
side is an error when the config is resolved, never a setting that falls back to a default."""

import dataclasses
import json
import pathlib

import pytest

from flaxvae import config as config_lib
from flaxvae import defaults, models, settings
from flaxvae.errors import ConfigError
from flaxvae.models.registry import MODELS
from flaxvae.train import step as step_lib
from flaxvae.train import trainer
from tests.conftest import load_config, set_keys, tiny_config

CONFIGS = sorted(p.stem for p in (pathlib.Path(__file__).parents[1] / "configs").glob("*.py"))


def flat_keys(config, prefix=""):
  """{"a.b": value} of a ConfigDict's leaves; the model's own options as model.KEY."""
  out = {}
  for key, value in config.items():
    if hasattr(value, "items"):
      out.update(flat_keys(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def flat_fields(resolved, prefix=""):
  """{"a.b": value} of a settings dataclass's leaves, the same way round."""
  out = {}
  for field in dataclasses.fields(resolved):
    value = getattr(resolved, field.name)
    if isinstance(value, settings.ModelSettings):
      out.update(
        {f"{prefix}{field.name}.{k}": v for k, v in (("name", value.name), *value.options)}
      )
    elif dataclasses.is_dataclass(value):
      out.update(flat_fields(value, f"{prefix}{field.name}."))
    elif field.name not in settings.STAMPS:
      out[prefix + field.name] = value
  return out


def test_every_default_key_maps_to_a_field_and_every_field_to_a_key():
  config = defaults.base_config()
  keys, fields = flat_keys(config), flat_fields(settings.resolve(config))
  assert set(keys) == set(fields)
  assert all(fields[k] == v for k, v in keys.items())  # the values themselves, untouched


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_keeps_its_own_options(name):
  config = set_keys(defaults.base_config(), model=defaults.model_config(name))
  resolved = settings.resolve(config).model
  assert resolved.name == name and resolved.kwargs() == models.model_options(name)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_resolves(name):
  assert settings.resolve(load_config(name)).model.name == load_config(name).model.name


def test_a_key_with_no_field_is_an_error_naming_it():
  config = defaults.base_config()
  with config.unlocked():
    config.eval.log_px_estimtor = "ais"  # a typo: it would silently do nothing
  with pytest.raises(
    ConfigError,
    match=r"unknown config key 'eval\.log_px_estimtor': .*did you "
    r"mean eval\.log_px_estimator\b",
  ) as e:
    settings.resolve(config)
  assert "\n" not in str(e.value)


def test_a_field_with_no_key_is_an_error_naming_it():
  config = defaults.base_config()
  with config.unlocked():
    del config.optimizer["adaptive_skip_window"]
  with pytest.raises(ConfigError, match=r"config key optimizer\.adaptive_skip_window is missing"):
    settings.resolve(config)


def test_settings_are_frozen_and_lists_become_tuples():
  config = set_keys(defaults.base_config(), **{"optimizer.frozen": ["decoder"]})
  resolved = settings.resolve(config)
  assert resolved.optimizer.frozen == ("decoder",)
  with pytest.raises(dataclasses.FrozenInstanceError):
    resolved.eval.log_px_estimator = "ais"
  replaced = dataclasses.replace(resolved.eval, log_px_estimator="ais")
  assert replaced.log_px_estimator == "ais" and resolved.eval.log_px_estimator == "iwae"


def test_the_checks_of_validate_run_on_resolve():
  with pytest.raises(ConfigError, match="batch_size must be positive, got 0"):
    settings.resolve(tiny_config(batch_size=0))
  with pytest.raises(ConfigError, match="model 'mlp' has no key"):
    settings.resolve(tiny_config(**{"model.depth": 3}))


def test_a_saved_config_of_an_earlier_version_resolves_with_its_stamps():
  saved = json.loads(defaults.base_config().to_json_best_effort())
  del saved["data"]["protocol"]
  saved["data"]["binarization"] = "dynamic"  # flaxvae 0.1's key
  saved["image_shape"] = [28, 28, 1]
  resolved = settings.resolve(config_lib.with_defaults(saved))
  assert resolved.flaxvae_version == "0.1.0" and resolved.image_shape == (28, 28, 1)
  assert resolved.data.protocol == "binarized"
  assert settings.resolve(defaults.base_config()).flaxvae_version is None


def test_a_saved_config_with_a_key_flaxvae_lacks_loads_with_a_warning(caplog):
  """A checkpoint cannot be edited: a key an earlier flaxvae accepted (a typo, a setting since
  removed) is dropped with one warning naming it, where a config file's would be an error."""
  saved = json.loads(defaults.base_config().to_json_best_effort())
  saved["eval"]["log_px_estimtor"] = "ais"
  saved["removed_setting"] = 1
  with caplog.at_level("WARNING", logger="flaxvae"):
    resolved = settings.resolve(config_lib.with_defaults(saved))
  assert resolved.eval.log_px_estimator == "iwae"
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(warnings) == 1
  assert "eval.log_px_estimtor" in warnings[0] and "removed_setting" in warnings[0]


def test_train_refuses_resolved_settings_in_one_line():
  with pytest.raises(ConfigError, match="train\\(\\) takes the ConfigDict") as e:
    trainer.train(settings.resolve(defaults.base_config()), "/nonexistent")
  assert "\n" not in str(e.value)


def test_sections_resolve_under_string_annotations():
  """A dataclass whose annotations are strings (`from __future__ import annotations`) still
  resolves its sections: _section reads the types with typing.get_type_hints."""

  @dataclasses.dataclass(frozen=True)
  class Outer:
    eval: "settings.EvalSettings"

  config = defaults.base_config()
  resolved = settings._section(Outer, {"eval": config.eval}, "")
  assert isinstance(resolved.eval, settings.EvalSettings)


def test_step_config_sets_every_field_from_its_setting():
  """No StepConfig field keeps its default: each is read from a setting by name."""
  config = tiny_config(
    ema_decay=0.5,
    **{
      "objective.num_samples": 3,
      "objective.beta": 0.5,
      "objective.kl_warmup_steps": 7,
      "objective.free_bits": 0.25,
      "objective.free_bits_per": "layer",
      "optimizer.skip_nonfinite": False,
      "optimizer.skip_threshold": 9.0,
      "optimizer.adaptive_skip": 4.0,
      "optimizer.adaptive_skip_quantile": 0.5,
      "optimizer.grad_clip_norm": 2.0,
    },
  )
  cfg = step_lib.step_config(settings.resolve(config))
  for field in dataclasses.fields(step_lib.StepConfig):
    # objective and accumulate_steps (which free bits refuses) are checked below, and the
    # latent autoencoder's two (which an MLP refuses) in tests/train/test_two_players.py
    if field.default is not dataclasses.MISSING and field.name not in (
      "objective",
      "accumulate_steps",
      "perceptual_weight",
      "adversary",
    ):
      assert getattr(cfg, field.name) != field.default, field.name
  assert cfg.objective == "elbo" and cfg.protocol.name == "binarized"
  step_config = lambda **keys: step_lib.step_config(settings.resolve(tiny_config(**keys)))
  assert step_config(**{"optimizer.accumulate_steps": 2}).accumulate_steps == 2
  iwae = step_config(**{"objective.name": "iwae"})
  assert iwae.objective == "iwae"
