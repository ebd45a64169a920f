"""Fine-tuning a published KL autoencoder's decoder (Stability's SD-VAE-ft recipe) on your data.

SD-VAE-ft-EMA and -MSE retrained only the decoder of the Stable Diffusion VAE, so latents of
the frozen encoder stay what diffusion models were trained on: batch 192, an EMA of the
weights, first L1 + LPIPS (313k steps, "ft-EMA"), then MSE + 0.1 LPIPS (280k steps, "ft-MSE").
Here: the encoder and quant_conv are frozen (optimizer.frozen), the run starts from an imported
run's parameters (init.params_from), evaluates with the EMA, no discriminator (the published
recipe names none). The learning rate was not published; LDM's per-example rate is used.

    flaxvae import-weights path/to/sd-vae --workdir runs/sd_vae --data imagenet256
    flaxvae train --config configs/finetune_sd_vae_decoder.py:runs/sd_vae --workdir runs/ft
    flaxvae train --config configs/finetune_sd_vae_decoder.py:runs/ft,mse --workdir runs/ft_mse

get_config("WORKDIR[,mse][,bf16][,tiny]"): WORKDIR (an imported or trained autoencoder_kl run)
gives the architecture and the starting weights; without one, SD 1.x's architecture and
init.params_from to set (--config.init.params_from=DIR). `mse`: the second stage (L2 with
weight 1 in [-1, 1] units: the gaussian likelihood at LDM's logvar -log 2, + 0.1 LPIPS);
`bf16`: bfloat16 compute (float32 parameters and normalisation statistics); `tiny`: tests.
"""

import json
import math
import os

from flaxvae import config as config_lib
from flaxvae import defaults

SD_VAE_FT_STEPS = {"l1": 313_000, "mse": 280_000}


def get_config(arg=None):
  words = [w for w in (arg or "").split(",") if w]
  unknown = [w for w in words if w not in ("mse", "bf16", "tiny") and not os.path.isdir(w)]
  if unknown:
    raise ValueError(f"unknown argument {unknown[0]!r}: WORKDIR, mse, bf16 or tiny")
  workdir = next((w for w in words if os.path.isdir(w)), "")
  stage = "mse" if "mse" in words else "l1"
  config = defaults.ldm_autoencoder_recipe(data="imagenet256", batch_size=192)
  if workdir:  # the imported (or trained) run's architecture and data
    with open(os.path.join(workdir, "config.json")) as f:
      saved = config_lib.with_defaults(json.load(f))
    config.model, config.data = saved.model, saved.data
  config.init.params_from = workdir
  config.adversary = defaults.adversary_config()
  config.optimizer.frozen = ("encoder", "quant_conv")
  config.ema_decay = 0.9999
  config.num_steps = SD_VAE_FT_STEPS[stage]
  if stage == "mse":
    config.objective.likelihood = "gaussian"
    config.model.logvar_init = -math.log(2.0)  # (x - out)^2 / (2 exp(logvar)): weight 1
    config.objective.perceptual_weight = 0.1
  if "bf16" in words:
    config.dtype = "bfloat16"
  if "tiny" in words:
    model = config.model
    config = defaults.tiny_variant(config)
    if workdir:  # the weights fix the architecture: only the run is shrunk
      config.model = model
  return config
