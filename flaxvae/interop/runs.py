"""A published KL autoencoder as a flaxvae run directory, and a run's weights back out.

Why a run directory: everything flaxvae does with a model (evaluate, sample, latent-stats,
`flaxvae.load`, fine-tuning with init.params_from) reads a workdir's checkpoint and its saved
config, so an import writes exactly that: the config (LDM's recipe, or the caller's, with model
autoencoder_kl and the imported architecture), a step-0 checkpoint whose parameters are the
imported weights (optimizer state fresh), and IMPORT_FILE with the source and diffusers'
config, whose latent normalisation (scaling and shift factors) an export writes back unless
`flaxvae latent-stats` measured new ones.
"""

import json
import logging
import os

import numpy as np

from flaxvae import config as config_lib
from flaxvae import data as data_lib
from flaxvae import defaults
from flaxvae.errors import ConfigError, UsageError
from flaxvae.interop import vae_weights

log = logging.getLogger(__name__)
IMPORT_FILE = "imported_weights.json"
LATENT_STATS_FILE = "latent_stats.json"  # what `flaxvae latent-stats` writes (eval/latent_stats.py)


def import_config(options, data="imagenet256", base=None):
  """The imported run's ConfigDict: `base` (default LDM's recipe without its discriminator,
  which no published weights include and evaluation does not use) with model autoencoder_kl
  and the imported architecture `options`."""
  config = base
  if config is None:
    config = defaults.ldm_autoencoder_recipe(data=data, batch_size=8)
    config.adversary = defaults.adversary_config()
  with config.unlocked():
    config.model = defaults.model_config("autoencoder_kl", **options)
  return config


def build_model(
  source, *, image_size=None, dtype="float32", likelihood="laplace", norm_groups=None
):
  """(autoencoder_kl nnx model holding SOURCE's weights, {scaling_factor, shift_factor}),
  without a run directory: for scripts that only encode and decode (image_size: the side the
  model is built at, default the config's sample_size; other sizes encode and decode too)."""
  from flax import nnx  # noqa: PLC0415

  from flaxvae import models, settings  # noqa: PLC0415
  from flaxvae.objectives import likelihoods  # noqa: PLC0415

  state, cfg, _ = vae_weights.read_source(source, norm_groups)
  options, image_shape, scaling = vae_weights.options_from_diffusers_config(
    cfg, f"{source} (config)", image_size
  )
  model = models.create_model(
    settings.resolve_model(defaults.model_config("autoencoder_kl", **options)),
    image_shape=image_shape,
    likelihood=likelihoods.get_likelihood(likelihood),
    dtype=config_lib.DTYPES[dtype],
  )
  graphdef, variables = nnx.split(model)
  params = vae_weights.diffusers_to_params(state, nnx.to_pure_dict(variables), source)
  nnx.replace_by_pure_dict(variables, params)
  return nnx.merge(graphdef, variables), scaling


def import_weights(
  source, workdir, *, data="imagenet256", image_size=None, config=None, norm_groups=None
):
  """Writes `workdir` (which must hold no checkpoint yet) from SOURCE (vae_weights.read_source):
  returns the workdir. `image_size`: the side the run works at (default the config's
  sample_size); `config`: a ConfigDict to build on instead of LDM's recipe."""
  from flaxvae.run import Run  # noqa: PLC0415  (the conversions alone need no JAX)
  from flaxvae.train import checkpoint as checkpoint_lib  # noqa: PLC0415

  checkpoints = os.path.join(workdir, "checkpoints")
  if os.path.isdir(checkpoints) and any(p.isdigit() for p in os.listdir(checkpoints)):
    raise UsageError(f"{workdir} already holds checkpoints: import into a new --workdir")
  state, cfg, kind = vae_weights.read_source(source, norm_groups)
  options, image_shape, scaling = vae_weights.options_from_diffusers_config(
    cfg, f"{source} (config)", image_size
  )
  config = import_config(options, data, config)
  run = Run(config, data_lib.ArrayDataset({}), for_training=False, image_shape=image_shape)
  params = vae_weights.diffusers_to_params(state, run.params, source)
  if "logvar" in run.params:  # the loss's learned logvar is not in the published weights
    params["logvar"] = np.asarray(run.params["logvar"])
  run.params = params
  config_json = dict(config_lib.to_json(config), image_shape=list(image_shape))
  checkpointer = checkpoint_lib.Checkpointer(workdir, run.settings.checkpoint)
  checkpointer.check_writable()
  checkpointer.start_writing()
  checkpointer.save(0, run.initial_state(), {"imported_from": os.path.abspath(source)}, config_json)
  checkpointer.close()
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  record = {"source": os.path.abspath(source), "layout": kind, "diffusers_config": cfg, **scaling}
  with open(os.path.join(workdir, IMPORT_FILE), "w") as f:
    json.dump(record, f, indent=2)
  log.info("imported %s (%s layout) into %s", source, kind, workdir)
  return workdir


def latent_normalisation(workdir):
  """{scaling_factor, shift_factor} for an export: the imported config's, replaced by what
  `flaxvae latent-stats` measured (WORKDIR/latent_stats.json) when present: SD3/FLUX's shift
  and scale where the imported config had a shift, LDM's 1/std alone otherwise."""
  record = {}
  path = os.path.join(workdir, IMPORT_FILE)
  if os.path.exists(path):
    with open(path) as f:
      record = json.load(f)
  scaling = {k: record.get(k) for k in ("scaling_factor", "shift_factor")}
  path = os.path.join(workdir, LATENT_STATS_FILE)
  if os.path.exists(path):
    with open(path) as f:
      stats = json.load(f)
    if scaling["shift_factor"] is None:
      scaling = {"scaling_factor": float(stats["latent_scale_ldm"]), "shift_factor": None}
    else:
      scaling = {
        "scaling_factor": float(stats["latent_scale"]),
        "shift_factor": float(stats["latent_shift"]),
      }
  return scaling


def export_weights(workdir, dest, step=None):
  """diffusers' layout of a run's weights (the evaluation parameters: EMA when kept) in
  directory `dest`: config.json + diffusion_pytorch_model.safetensors. Returns dest."""
  from flaxvae import api  # noqa: PLC0415

  model = api.load(workdir, step)
  if model.settings.model.name != "autoencoder_kl":
    raise ConfigError(
      f"export-weights writes diffusers' AutoencoderKL: {workdir} holds model "
      f"{model.settings.model.name!r}, not autoencoder_kl"
    )
  options = {k: v for k, v in model.settings.model.kwargs().items() if k in vae_weights.MODEL_KEYS}
  base = None
  path = os.path.join(workdir, IMPORT_FILE)
  if os.path.exists(path):
    with open(path) as f:
      base = json.load(f).get("diffusers_config")
  cfg = vae_weights.diffusers_config(
    options, model.run.image_shape, latent_normalisation(workdir), base
  )
  return vae_weights.write_diffusers(dest, vae_weights.params_to_diffusers(model.params), cfg)
