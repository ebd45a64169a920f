"""VAE models on one contract (contract.py), chosen by name from a registry (`config.model.name`).

A new model is one new file here that registers itself with `@MODELS.register("name")` and is
imported below, plus a config. Model-specific config keys are its constructor's keyword
arguments (their defaults live there, and only there); `create_model` refuses unknown keys.
"""

import inspect

import jax.numpy as jnp
from flax import nnx

from flaxvae.errors import ConfigError
from flaxvae.models import autoencoder_kl, conv, ladder, layers, mlp, vdvae  # noqa: F401  (each registers itself)
from flaxvae.models.registry import MODELS

COMMON = ("image_shape", "likelihood", "rngs", "dtype")


def model_options(name):
  """{key: default} of the model's own config keys (its constructor's keyword arguments)."""
  signature = inspect.signature(MODELS.get(name).__init__)
  return {
    k: p.default
    for k, p in signature.parameters.items()
    if p.kind == p.KEYWORD_ONLY and k not in COMMON
  }


def check_config(model):
  """ConfigError for an unknown model or model key, naming the model's keys (`model`:
  settings.ModelSettings)."""
  options, given = model_options(model.name), model.kwargs()
  unknown = sorted(set(given) - set(options))
  if unknown:
    raise ConfigError(
      f"model {model.name!r} has no key(s) {', '.join(unknown)}: its keys "
      f"are {', '.join(sorted(options))}"
    )
  activation = given.get("activation")
  if activation is not None and activation not in layers.ACTIVATIONS:
    raise ConfigError(
      f"unknown model.activation {activation!r}: choose one of "
      f"{', '.join(sorted(layers.ACTIVATIONS))}"
    )


def create_model(model, *, image_shape, likelihood, seed=0, dtype=jnp.float32, abstract=False):
  """Builds the registered model `model.name` (settings.ModelSettings) for images of
  `image_shape`; `abstract`: from shapes alone (nnx.eval_shape: parameters are
  ShapeDtypeStructs, nothing is allocated)."""
  check_config(model)
  build = lambda: MODELS.get(model.name)(
    image_shape=tuple(image_shape),
    likelihood=likelihood,
    rngs=nnx.Rngs(seed),
    dtype=dtype,
    **model.kwargs(),
  )
  if not abstract:
    return build()
  with layers.shapes_only():
    return nnx.eval_shape(build)
