"""`flaxvae reconstruct`: a trained autoencoder's reconstructions of your own images, of any
size, whole or in tiles (models/tiling.py) when whole ones do not fit the device.

Why: a latent autoencoder is trained on crops (256 px) but used on whatever its diffusion
model makes (1024 px and more); this is how a user sees what it does to those, and checks how
far tiled processing is from whole-image processing on their images.

Each image is encoded to its posterior mean and decoded through the likelihood's mean (as the
evaluation's reconstructions are), at its own size: the network is built for the image (or the
tile) with the trained parameters (tiling.model_at_size). Images: PNG/JPEG files, a folder of
them, or .npy arrays of uint8 [H, W, C] or [n, H, W, C]. Writes OUT/NAME.png per image and
returns each one's PSNR against its original.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from flaxvae import api
from flaxvae.data import protocols
from flaxvae.errors import ConfigError
from flaxvae.eval import image_metrics
from flaxvae.models import contract, tiling

PICTURES = (".png", ".jpg", ".jpeg")


def _arrays(path):
  """[(name, uint8 [H, W, C])] of one file."""
  stem, ext = os.path.splitext(os.path.basename(path))
  if ext.lower() == ".npy":
    array = np.load(path)
    if array.dtype != np.uint8 or array.ndim not in (3, 4):
      raise ConfigError(
        f"{path}: .npy images must be uint8 [H, W, C] or [n, H, W, C], got {array.dtype} "
        f"{list(array.shape)}"
      )
    if array.ndim == 3:
      return [(stem, array)]
    return [(f"{stem}_{i}", image) for i, image in enumerate(array)]
  image = np.asarray(Image.open(path))
  return [(stem, image[..., None] if image.ndim == 2 else image)]


def read_images(path):
  """[(name, uint8 [H, W, C])] of a picture, an .npy array or a folder of them."""
  if os.path.isdir(path):
    files = sorted(
      os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith((*PICTURES, ".npy"))
    )
  elif os.path.isfile(path):
    files = [path]
  else:
    raise ConfigError(f"--images {path}: no such file or folder")
  if not files:
    raise ConfigError(f"--images {path}: no .png, .jpg or .npy files there")
  return [pair for f in files for pair in _arrays(f)]


def reconstruct_fn(run, image_shape, tile, overlap):
  """A jitted fn(params, x01 [1, H, W, C]) -> reconstruction in [0, 1], whole (tile 0) or in
  tiles of `tile` pixels overlapping by `overlap` (the latents' tiles: both divided by the
  downsampling factor)."""
  height, width, _ = image_shape
  factor = tiling.downsampling_factor(run.settings.model)
  if height % factor or width % factor:
    raise ConfigError(
      f"an image of {height}x{width}: the autoencoder downsamples by {factor}, crop it to "
      f"multiples of {factor}"
    )
  if tile % factor or overlap % factor:
    raise ConfigError(f"--tile and --overlap must be multiples of {factor}, the downsampling")
  built = (min(tile, height), min(tile, width), image_shape[2]) if tile else tuple(image_shape)
  graphdef = tiling.model_at_size(
    run.settings.model,
    run.likelihood,
    run.model.dtype,
    run.image_shape,
    built,
  )

  def fn(params, x):
    model = nnx.merge(graphdef, params)
    decode = lambda z: model.likelihood.mean(model.decode(z))
    if not tile:
      mean, _ = model.encode(x)
      return jnp.clip(decode(mean), 0.0, 1.0)
    mean, _ = tiling.tiled(model.encode, x, tile, overlap, "the encoder's input")
    out = tiling.tiled(decode, mean, tile // factor, overlap // factor, "the decoder's input")
    return jnp.clip(out, 0.0, 1.0)

  return jax.jit(fn)


def reconstruct(workdir, images_path, out_dir, tile=0, overlap=0, step=None):
  """Writes OUT/NAME.png for each image; returns [(name, psnr in dB, path)]."""
  if tile < 0 or overlap < 0 or (tile and overlap >= tile):
    raise ConfigError(
      f"--tile must be >= 0 (0: whole images) and --overlap in [0, tile), got {tile}, {overlap}"
    )
  model = api.load(workdir, step)
  run = model.run
  if not contract.has(run.model, contract.RECONSTRUCTION):
    raise ConfigError(
      f"reconstruct needs a latent autoencoder (model autoencoder_kl), not "
      f"{run.settings.model.name!r}"
    )
  images = read_images(images_path)
  os.makedirs(out_dir, exist_ok=True)
  compiled, results = {}, []
  for name, image in images:
    if image.shape[-1] != run.image_shape[-1]:
      raise ConfigError(
        f"{name}: {image.shape[-1]} channels, the model takes {run.image_shape[-1]}"
      )
    if image.shape not in compiled:
      compiled[image.shape] = reconstruct_fn(run, image.shape, tile, overlap)
    x = protocols.eval_targets(jnp.asarray(image[None]), jnp.arange(1), run.protocol)
    recon = compiled[image.shape](model.params, x)
    psnr = float(image_metrics.psnr(x, recon)[0])
    path = os.path.join(out_dir, f"{name}.png")
    pixels = np.round(np.asarray(recon[0]) * 255).astype(np.uint8)
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(path)
    results.append((name, psnr, path))
  return results
