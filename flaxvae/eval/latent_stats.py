"""`flaxvae latent-stats`: the statistics a latent diffusion model normalises its latents with.

Why: a diffusion model trained in an autoencoder's latent space expects latents of about unit
variance. LDM multiplies them by scale_factor = 1 / std of the latents (SD 1.x's 0.18215, SDXL's
0.13025); SD3 and FLUX also subtract a shift, (z - shift) * scale. These figures belong to the
autoencoder, so they are measured once over a dataset split and written beside the checkpoint,
where `export-weights` puts them into diffusers' config.json (scaling_factor, shift_factor).

The latents are posterior SAMPLES z ~ q(z|x) by default (what the diffusion model is trained
on; LDM computed its scale from samples), keyed by example id with the evaluation's key and
stream, so over the same examples they are the evaluation row's latent_* figures; `--posterior
mean` takes the posterior means instead. The examples go through the sharded evaluator
(eval/evaluator.py); per example only its channels' means and centred sums of squares come
back, merged exactly on the host in float64 (image_metrics.LatentStatistics).

WORKDIR/latent_stats.json (docs/interop.md describes it):
  latent_mean, latent_std   per channel [c], over examples and positions (std unbiased)
  latent_shift              the mean of all latent elements (SD3 / FLUX shift_factor)
  latent_scale              1 / their std (SD3 / FLUX scaling_factor)
  latent_scale_ldm          the same 1 / std, LDM's scale_factor (SD 1.x, SDXL: no shift)
  split, num_examples, step, posterior, latent_shape
"""

import jax
import jax.numpy as jnp
import numpy as np

from flaxvae import api
from flaxvae.errors import ConfigError
from flaxvae.eval import diagnostics, evaluation, image_metrics, reconstruction
from flaxvae.eval.evaluator import Evaluator
from flaxvae.models import contract

FILE = "latent_stats.json"
POSTERIORS = ("sample", "mean")


def moments_fn(graphdef, protocol, posterior):
  """Per example, the per-channel mean and centred sum of squares of its latent: a posterior
  sample (keyed as the evaluation's reconstruction metrics key theirs) or the mean."""

  def fn(params, rng, images, ids):
    model, x, keys = diagnostics.per_example_inputs(graphdef, protocol, params, rng, images, ids)
    mean, logvar = model.encode(x)
    z = mean
    if posterior == "sample":
      latent_keys = diagnostics.stream_keys(keys, reconstruction.LATENT_STREAM)
      eps = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:]))(latent_keys)
      z = mean + jnp.exp(0.5 * logvar) * eps
    z = z if z.ndim == 4 else z.reshape(z.shape[0], 1, 1, -1)  # a flat latent: one position
    latent_mean, latent_m2 = image_metrics.latent_channel_moments(z)
    return {"latent_mean": latent_mean, "latent_m2": latent_m2}

  return fn


def latent_statistics(run, params, images, batch_size, rng, posterior="sample", label=None):
  """LatentStatistics.summary() of the latents of `images` (uint8 rows of the run's data) under
  `params`, sharded over the run's devices."""
  if posterior not in POSTERIORS:
    raise ConfigError(f"--posterior {posterior!r}: use one of {', '.join(POSTERIORS)}")
  if not contract.has(run.model, contract.AGGREGATE_POSTERIOR) and not contract.has(
    run.model, contract.RECONSTRUCTION
  ):
    raise ConfigError(
      f"latent-stats needs a model that encodes to one Gaussian latent; model "
      f"{run.settings.model.name!r} has {list(contract.capabilities(run.model)) or 'none'}"
    )
  evaluator = Evaluator(run.runner, images, batch_size)
  found = evaluator.per_example(
    f"latent_stats_{posterior}",
    moments_fn(run.graphdef, run.protocol, posterior),
    params,
    rng,
    progress=label,
  )
  shape = run.model.latent_shapes[0]
  positions = int(np.prod(shape[:-1])) if len(shape) == 3 else 1
  stats = image_metrics.LatentStatistics().update(
    found["latent_mean"], found["latent_m2"], positions
  )
  if stats.count < 2:
    raise ConfigError(
      "latent statistics need at least 2 latent elements per channel: raise --max_examples"
    )
  return stats.summary()


def compute(workdir, split=None, max_examples=None, batch_size=None, step=None, posterior="sample"):
  """`flaxvae latent-stats`: (the statistics, the path of WORKDIR/latent_stats.json)."""
  if max_examples is not None and max_examples < 0:
    raise ConfigError(f"--max_examples must be >= 0 (0: the whole split), got {max_examples}")
  if batch_size is not None and batch_size <= 0:
    raise ConfigError(f"--batch_size must be positive, got {batch_size}")
  model = api.load(workdir, step)
  run, settings = model.run, model.settings
  split = split or settings.data.eval_split
  images = run.eval_images if split == settings.data.eval_split else run.dataset.images(split)
  images = images[: max_examples or len(images)]
  row = latent_statistics(
    run,
    model.params,
    images,
    batch_size or settings.eval.batch_size,
    evaluation.eval_rng(settings.seed),
    posterior,
    label=f"latent statistics ({split})",
  )
  row.update(
    split=split,
    num_examples=len(images),
    step=model.step,
    posterior=posterior,
    latent_shape=list(run.model.latent_shapes[0]),
  )
  return row, evaluation.write_json(workdir, FILE, row)
