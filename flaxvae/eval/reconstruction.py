"""How well an autoencoder reconstructs, for evaluation rows: PSNR, SSIM, LPIPS, rFID, latent
statistics, and a reconstruction grid.

Latent autoencoders (LDM's KL-f8, the SD, SDXL, SD3 and FLUX VAEs) are judged by their
reconstructions, not by a likelihood: evaluation.diagnose adds these figures to the row of a
model with the "reconstruction" capability (models/contract.py), after the importance pass,
whose `rate` is already the KL of q(z|x) to the prior in nats per example. Each image is
reconstructed from the posterior MEAN (what LDM and the VAE model cards report), through the
likelihood's mean, clipped to [0, 1], and compared with the evaluated image as the model saw it
(the data protocol's targets):
  psnr, ssim   per image, then mean and standard error over images (image_metrics.py)
  lpips        per image (objectives/perceptual.py), when its weights are prepared
  rfid         the Frechet distance between Inception-v3 pool features (eval/inception.py) of
               the reconstructions and of the originals, over the first eval.rfid_examples
               evaluated examples (0: all), in the final evaluation only (Inception at 299 px
               costs more than the rest of an evaluation), when its weights are prepared
  latent_*     per-channel mean and std of posterior SAMPLES z ~ q(z|x) (what a latent
               diffusion model is trained on: LDM's scale_factor is 1 / the std of its first
               batch's samples), over every evaluated example and position, and the scale and
               shift derived from them (image_metrics.LatentStatistics)
A metric that cannot run (weights absent, images smaller than its window) is named under the
row's `skipped` with why, never reported as zero.

The evaluated examples go through the evaluator (evaluator.Evaluator: sharded over the devices)
in blocks of a few batches; Inception features and latent moments are merged on the host in
float64 block by block, so the whole split fits whatever its size. Latent samples are keyed by
example id, so a subset or another block size draws the same ones.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxvae.data import protocols
from flaxvae.errors import WeightsMissing
from flaxvae.eval import diagnostics, image_metrics, inception
from flaxvae.models import contract
from flaxvae.objectives import perceptual
from flaxvae.train import outputs

LATENT_STREAM = 8  # folded into an example's key for its latent sample (diagnostics.py: 2-7)
BLOCK_BATCHES = 4  # evaluator batches per block: the features held at once


def applies(model, eval_settings):
  """Whether these metrics belong in the model's rows: models with the "reconstruction"
  capability; with eval.reconstruction_metrics also other models that encode and decode one
  Gaussian latent (a baseline VAE compared on the same figures)."""
  if contract.has(model, contract.RECONSTRUCTION):
    return True
  asked = eval_settings.reconstruction_metrics
  return bool(asked) and contract.has(model, contract.AGGREGATE_POSTERIOR)


def reconstruct(model, x):
  """(posterior mean [b, ...], logvar, the mean's reconstruction in [0, 1]) for images x01."""
  mean, logvar = model.encode(x)
  return mean, logvar, jnp.clip(model.likelihood.mean(model.decode(mean)), 0.0, 1.0)


def _colour(images01):
  """Grey images as three equal channels: LPIPS and Inception take RGB."""
  return jnp.repeat(images01, 3, axis=-1) if images01.shape[-1] == 1 else images01


def metrics_fn(graphdef, protocol, with_ssim, with_lpips, with_inception):
  """Per example: psnr, ssim, lpips, the posterior sample's per-channel latent moments and, with
  `with_inception`, the Inception features of reconstruction and original.

  fn((params, lpips_weights, inception_weights), (rng, first_id), images, ids): the weights are
  arguments (never compiled in as constants), `first_id` the id of the block's first example.
  """

  def fn(inputs, rng_and_first, images, ids):
    params, lpips_weights, inception_weights = inputs
    rng, first_id = rng_and_first
    ids = ids + first_id
    model, x, keys = diagnostics.per_example_inputs(graphdef, protocol, params, rng, images, ids)
    mean, logvar, recon = reconstruct(model, x)
    out = {"psnr": image_metrics.psnr(x, recon)}
    if with_ssim:
      out["ssim"] = image_metrics.ssim(x, recon)
    if with_lpips:
      out["lpips"] = perceptual.lpips(lpips_weights, 2.0 * x - 1.0, 2.0 * recon - 1.0)
    if with_inception:
      out["inception_reconstructions"] = inception.inception_features(
        inception_weights, _colour(recon)
      )
      out["inception_originals"] = inception.inception_features(inception_weights, _colour(x))
    latent_keys = diagnostics.stream_keys(keys, LATENT_STREAM)
    eps = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:]))(latent_keys)
    z = mean + jnp.exp(0.5 * logvar) * eps
    z = z if z.ndim == 4 else z.reshape(z.shape[0], 1, 1, -1)  # a flat latent: one position
    out["latent_mean"], out["latent_m2"] = image_metrics.latent_channel_moments(z)
    return out

  return fn


def _lpips_weights(image_shape):
  """(LPIPS weights or None, why not)."""
  if min(image_shape[:2]) < perceptual.MIN_SIDE:
    return None, f"LPIPS needs images of at least {perceptual.MIN_SIDE} pixels a side"
  try:
    return perceptual.load_lpips_weights(), None
  except WeightsMissing as e:
    return None, str(e)


def _inception_weights():
  """(Inception weights or None, why not)."""
  try:
    return inception.load_inception_weights(), None
  except WeightsMissing as e:
    return None, str(e)


def blocks(n, rfid_examples, block):
  """[(start, stop, with_inception)] covering n examples in blocks of at most `block`, the
  first `rfid_examples` of them (a block boundary) with Inception features."""
  edges = []
  for first, last, with_inception in ((0, rfid_examples, True), (rfid_examples, n, False)):
    edges += [(s, min(s + block, last), with_inception) for s in range(first, last, block)]
  return edges


def reconstruction_metrics(run, evaluator, params, rng, num_examples, final, label, eval_settings):
  """The row's reconstruction fields (module doc): per-example arrays (psnr, ssim, lpips) and
  figures, with `skipped` naming each metric that could not run and why."""
  images = evaluator.images
  n = min(num_examples or len(images), len(images))
  image_shape = images.shape[1:]
  skipped = {}
  with_ssim = min(image_shape[:2]) >= image_metrics.SSIM_WINDOW
  if not with_ssim:
    skipped["ssim"] = f"SSIM needs images of at least {image_metrics.SSIM_WINDOW} pixels a side"
  lpips_weights, why = _lpips_weights(image_shape)
  if why:
    skipped["lpips"] = why
  rfid_examples = 0
  inception_weights = None
  if not final:
    skipped["rfid"] = "computed in the final evaluation only"
  else:
    inception_weights, why = _inception_weights()
    asked = eval_settings.rfid_examples
    rfid_examples = min(asked or n, n) if inception_weights is not None else 0
    if why or rfid_examples < 2:
      skipped["rfid"] = why or "needs at least 2 examples"
      rfid_examples = 0
  weights = (params, lpips_weights or {}, inception_weights or {})
  per_example, latents = {}, image_metrics.LatentStatistics()
  features = {name: image_metrics.StreamingMoments() for name in ("reconstructions", "originals")}
  block = BLOCK_BATCHES * evaluator.batch_for(n)
  for start, stop, with_inception in blocks(n, rfid_examples, block):
    flags = (with_ssim, lpips_weights is not None, with_inception)
    found = evaluator.per_example(
      "reconstruction" + "".join(str(int(f)) for f in flags),
      metrics_fn(run.graphdef, run.protocol, *flags),
      weights,
      (rng, np.int32(start)),
      rows=images[start:stop],
      progress=label(f"reconstructions {start}-{stop} of {n}"),
    )
    latent_mean, latent_m2 = found.pop("latent_mean"), found.pop("latent_m2")
    latents.update(latent_mean, latent_m2, positions=_positions(run.model))
    for name, moments in features.items():
      if with_inception:
        moments.update(found.pop(f"inception_{name}"))  # then dropped: only moments are kept
    for key, value in found.items():
      per_example.setdefault(key, []).append(value)
  row = {key: np.concatenate(parts) for key, parts in per_example.items()}
  if latents.count >= 2:
    row.update(latents.summary())
  else:
    skipped["latent_statistics"] = "need at least 2 latent elements per channel"
  if rfid_examples:
    row["rfid"] = image_metrics.frechet_distance_of(
      features["reconstructions"], features["originals"]
    )
    row["rfid_examples"] = rfid_examples
  if skipped:
    row["skipped"] = skipped
  return row


def _positions(model):
  """Latent positions per example (h * w of a [h, w, c] latent; 1 for a flat one)."""
  shape = model.latent_shapes[0]
  return int(np.prod(shape[:-1])) if len(shape) == 3 else 1


def save_grid(run, params, path, images_uint8, columns):
  """A PNG of the posterior mean's reconstructions (the ones the metrics score): rows of
  `columns` originals, each above its reconstructions, as sampling.save_image_grids lays out
  its sampled ones."""
  if not outputs.is_writer():
    return
  x, recon = mean_reconstructions(run, params, images_uint8)
  rows = []
  for start in range(0, len(x), columns):
    rows += [x[start : start + columns], recon[start : start + columns]]
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  outputs.save_image_grid(path, np.concatenate(rows), columns)


def mean_reconstructions(run, params, images_uint8):
  """uint8 images as evaluation scores them and their reconstructions from the posterior mean
  (the images PSNR, SSIM, LPIPS and rFID compare), both as host arrays."""
  ids = jnp.arange(len(images_uint8))
  x = protocols.eval_targets(jnp.asarray(images_uint8), ids, run.protocol)
  return np.asarray(x), np.asarray(_reconstruct_jit(run.graphdef, params, x))


@functools.partial(jax.jit, static_argnums=0)
def _reconstruct_jit(graphdef, params, x):
  return reconstruct(nnx.merge(graphdef, params), x)[2]
