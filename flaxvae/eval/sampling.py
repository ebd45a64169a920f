"""Images from a model: prior samples with a temperature, reconstructions, latent-level grids.

`flaxvae sample` and the trainer's image grids use these. Temperature scales the prior's
standard deviations (one value, or one per latent layer, top first); `keep_layers` L
reconstructs an image keeping the top L layers from q(z|x) and sampling the rest from the
prior (VDVAE's latent-level grids: what each layer of the hierarchy encodes).
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxvae.data import protocols
from flaxvae.errors import UsageError
from flaxvae.eval import reconstruction
from flaxvae.models.noise import NoiseSource
from flaxvae.train import outputs


@functools.partial(jax.jit, static_argnums=(0, 3))
def _sample(graphdef, params, key, n, temperature):
  model = nnx.merge(graphdef, params)
  return model.likelihood.mean(model.sample(key, n, temperature))


@functools.partial(jax.jit, static_argnums=(0, 4))
def _reconstruct(graphdef, params, x, key, keep_layers):
  model = nnx.merge(graphdef, params)
  noise = NoiseSource.from_key(key, x.shape[0])
  return model.likelihood.mean(model.reconstruct(x, noise, keep_layers))


def samples(run, params, key, n, temperature=1.0):
  """n images [n, H, W, C] in [0, 1]: the mean of p(x|z) for z from the prior at temperature."""
  temperature = jnp.asarray(temperature, jnp.float32)
  return np.asarray(_sample(run.graphdef, params, key, n, temperature))


def check_keep_layers(keep, depth):
  """A one-line error unless 0 <= keep <= depth (the model's number of latent layers)."""
  if not 0 <= keep <= depth:
    raise UsageError(
      f"keep_layers {keep} is not a count of the model's {depth} latent layers: "
      f"give 0 (all from the prior) to {depth} (all from q(z|x))"
    )


def reconstructions(run, params, images_uint8, key, keep_layers=None):
  """Reconstructions of uint8 images keeping the top `keep_layers` layers (None: all)."""
  ids = jnp.arange(len(images_uint8))
  x = protocols.eval_targets(jnp.asarray(images_uint8), ids, run.protocol)
  keep = len(run.model.latent_shapes) if keep_layers is None else keep_layers
  return np.asarray(x), np.asarray(_reconstruct(run.graphdef, params, x, key, keep))


def layer_grid(run, params, images_uint8, key, keep_layers):
  """Rows: the images, then their reconstructions keeping the top L layers for each L."""
  x, _ = reconstructions(run, params, images_uint8, key, 0)
  rows = [x] + [reconstructions(run, params, images_uint8, key, keep)[1] for keep in keep_layers]
  return np.concatenate(rows)


def save_image_grids(run, params, workdir, step, n, seed):
  """`n` prior samples (eval.num_image_samples) and as many test reconstructions (originals
  above their reconstructions), drawn from `seed` (the run's)."""
  if not outputs.is_writer():
    return
  params = jax.tree.map(jnp.asarray, params)
  columns = max(1, n // 4)
  x, recon = reconstructions(run, params, run.eval_images[: 2 * columns], jax.random.key(seed))
  pairs = np.concatenate([x[:columns], recon[:columns], x[columns:], recon[columns:]])
  images_dir = os.path.join(workdir, "images")
  os.makedirs(images_dir, exist_ok=True)
  outputs.save_image_grid(
    os.path.join(images_dir, f"reconstructions_{step:07d}.png"), pairs, columns
  )
  outputs.save_image_grid(
    os.path.join(images_dir, f"samples_{step:07d}.png"),
    samples(run, params, jax.random.key(seed), n),
  )
  if reconstruction.applies(run.model, run.settings.eval):  # those its metrics score
    path = os.path.join(images_dir, f"reconstructions_mean_{step:07d}.png")
    reconstruction.save_grid(run, params, path, run.eval_images[: 2 * columns], columns)


def write_sample_grid(model, workdir, n, temperature, keep_layers, seed=0, out=None):
  """`flaxvae sample`: prior samples (or latent-level reconstructions) of a loaded model as a
  PNG grid; returns its path."""
  run, key = model.run, jax.random.key(seed)
  if keep_layers:
    for keep in keep_layers:
      check_keep_layers(keep, len(run.model.latent_shapes))
    columns = min(n, len(run.eval_images))
    images = layer_grid(run, model.params, run.eval_images[:columns], key, keep_layers)
    name = f"layers_{'-'.join(str(k) for k in keep_layers)}_step{model.step}.png"
  else:
    t = temperature[0] if len(temperature) == 1 else temperature
    images = samples(run, model.params, key, n, t)
    columns = None
    name = f"samples_t{'-'.join(f'{v:g}' for v in temperature)}_step{model.step}.png"
  path = out or os.path.join(workdir, "images", name)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  outputs.save_image_grid(path, images, columns)
  return path
