"""Tiled encoding and decoding (flaxvae/models/tiling.py, issue 35): how far tiles are from whole
images, and the memory they save, for docs/interop.md.

    .venv/bin/python benchmarks/tiling.py seams [--workdir W --images X.npy] [--side 128]
        [--tile 64 --overlap 16]
    .venv/bin/python benchmarks/tiling.py memory [--sizes 1024,2048] [--tile 512 --overlap 128]
        [--dtype float32]

seams: the difference, in [0, 1] image units (images clipped as users see them), between
tiled and whole processing: the decoder's output from the same latents (the whole image's
posterior mean), the encoder's posterior mean (latent units), and the full reconstruction.
Without --workdir the model is the kl-f8 layout at width 32 with random weights on smooth
random images; with it, a trained run's parameters on --images (uint8 [n, H, W, C]).

memory: ahead of time (nothing runs), the compiled memory of encoding and decoding one image
of each size on one device, whole and in tiles, for configs/imagenet256_kl_f8.py's model
(channels 128): jax.jit(fn).lower(ShapeDtypeStructs).compile().memory_analysis().
"""

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flaxvae import api, bench, defaults, models, settings
from flaxvae.models import tiling
from flaxvae.objectives import likelihoods

KL_F8 = "configs/imagenet256_kl_f8.py"


def kl_f8_settings(**changes):
  config = defaults.load_config_file(KL_F8, None)
  model = settings.resolve_model(config.model)
  options = {**model.kwargs(), **changes}
  return settings.ModelSettings(model.name, tuple(options.items())), config


def smooth_images(n, side, channels, seed=0):
  """Random images with structure at several scales (sums of random low-frequency waves)."""
  rng = np.random.default_rng(seed)
  grid = np.linspace(0.0, 1.0, side)
  images = np.zeros((n, side, side, channels))
  for _ in range(12):
    fy, fx = rng.uniform(0.5, 8.0, 2)
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1, channels))
    images += np.sin(2 * np.pi * (fy * grid[:, None] + fx * grid[None, :]))[None, ..., None] + phase
  images = (np.sin(images) + 1.0) / 2.0
  return np.round(images * 255).astype(np.uint8)


def model_pieces(args):
  """(model settings, likelihood, trained shape, params, images uint8)."""
  if args.workdir:
    loaded = api.load(args.workdir)
    run = loaded.run
    images = np.load(args.images)
    return run.settings.model, run.likelihood, run.image_shape, loaded.params, images
  model_settings, _ = kl_f8_settings(channels=32)
  likelihood = likelihoods.get_likelihood("laplace")
  shape = (args.side, args.side, 3)
  model = models.create_model(model_settings, image_shape=shape, likelihood=likelihood)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return model_settings, likelihood, shape, params, smooth_images(2, args.side, 3)


def seams(args):
  model_settings, likelihood, trained, params, images = model_pieces(args)
  shape = images.shape[1:]
  factor = tiling.downsampling_factor(model_settings)
  whole = tiling.model_at_size(model_settings, likelihood, jnp.float32, trained, shape)
  tile_shape = (min(args.tile, shape[0]), min(args.tile, shape[1]), shape[2])
  tiled_def = tiling.model_at_size(model_settings, likelihood, jnp.float32, trained, tile_shape)

  def both(params, x):
    big, small = nnx.merge(whole, params), nnx.merge(tiled_def, params)
    image = lambda model: lambda z: jnp.clip(model.likelihood.mean(model.decode(z)), 0, 1)
    mean = big.encode(x)[0]
    mean_tiled = tiling.tiled(small.encode, x, args.tile, args.overlap)[0]
    latent_tile, latent_overlap = args.tile // factor, args.overlap // factor
    decoded = image(big)(mean)
    decoded_tiled = tiling.tiled(image(small), mean, latent_tile, latent_overlap)
    recon_tiled = tiling.tiled(image(small), mean_tiled, latent_tile, latent_overlap)
    return mean, mean_tiled, decoded, decoded_tiled, recon_tiled

  x = jnp.asarray(images, jnp.float32) / 255.0
  mean, mean_tiled, decoded, decoded_tiled, recon_tiled = jax.jit(both)(params, x)
  diff = lambda a, b: np.abs(np.asarray(a) - np.asarray(b))
  rows = {
    "decode (same latents), [0,1] units": diff(decoded, decoded_tiled),
    "encode (posterior mean), latent units": diff(mean, mean_tiled),
    "encode + decode, [0,1] units": diff(decoded, recon_tiled),
  }
  source = args.workdir or "kl-f8 layout, channels 32, random weights, smooth random images"
  print(
    f"model: {source}; images {list(images.shape)}; tile {args.tile} overlap {args.overlap}; "
    f"latent std {float(np.std(mean)):.3g}"
  )
  print("| output | max abs diff | mean abs diff |\n|---|---|---|")
  for name, d in rows.items():
    print(f"| {name} | {d.max():.3g} | {d.mean():.3g} |")


def memory(args):
  model_settings, _ = kl_f8_settings()
  likelihood = likelihoods.get_likelihood("laplace")
  dtype = jnp.dtype(args.dtype)
  print(f"kl-f8 (configs/imagenet256_kl_f8.py's model), compute {args.dtype}, {jax.devices()[0]}")
  print("| image | op | whole: temp MiB | tiled: temp MiB | whole / tiled | compile s |")
  print("|---|---|---|---|---|---|")
  for side in (int(s) for s in args.sizes.split(",")):
    for op, figures, seconds in memory_of(side, args, model_settings, likelihood, dtype):
      temp = [f.get("temp_size_in_bytes", 0) / 2**20 for f in figures]
      print(
        f"| {side} px | {op} | {temp[0]:,.0f} | {temp[1]:,.0f} | {temp[0] / max(temp[1], 1e-9):.1f}"
        f" | {seconds:.0f} |",
        flush=True,
      )
      if args.json:
        print(json.dumps({"side": side, "op": op, "whole": figures[0], "tiled": figures[1]}))


def memory_of(side, args, model_settings, likelihood, dtype):
  """[(op, [whole, tiled] memory_analysis figures, compile seconds)] for one image side."""
  factor = tiling.downsampling_factor(model_settings)
  latent_channels = model_settings.kwargs()["latent_channels"]
  shape, tile_shape = (side, side, 3), (args.tile, args.tile, 3)
  build = lambda size: tiling.model_at_size(model_settings, likelihood, dtype, (256, 256, 3), size)
  whole, small = build(shape), build(tile_shape)
  abstract = models.create_model(
    model_settings, image_shape=shape, likelihood=likelihood, dtype=dtype, abstract=True
  )
  params = nnx.to_pure_dict(nnx.split(abstract)[1])
  image = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
  latent = jax.ShapeDtypeStruct((1, side // factor, side // factor, latent_channels), jnp.float32)
  latent_tile, latent_overlap = args.tile // factor, args.overlap // factor
  fns = {
    "encode": (
      lambda p, x: nnx.merge(whole, p).encode(x),
      lambda p, x: tiling.tiled(nnx.merge(small, p).encode, x, args.tile, args.overlap),
      image,
    ),
    "decode": (
      lambda p, z: nnx.merge(whole, p).decode(z),
      lambda p, z: tiling.tiled(nnx.merge(small, p).decode, z, latent_tile, latent_overlap),
      latent,
    ),
  }
  rows = []
  for op, (plain, tiled, arg) in fns.items():
    figures, start = [], time.perf_counter()
    for fn in (plain, tiled):
      figures.append(bench._memory(jax.jit(fn).lower(params, arg).compile()) or {})
    rows.append((op, figures, time.perf_counter() - start))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("what", choices=["seams", "memory"])
  parser.add_argument("--workdir")
  parser.add_argument("--images")
  parser.add_argument("--side", type=int, default=128)
  parser.add_argument("--tile", type=int)
  parser.add_argument("--overlap", type=int)
  parser.add_argument("--sizes", default="1024,2048")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args()
  if args.what == "seams":
    args.tile, args.overlap = args.tile or 64, 16 if args.overlap is None else args.overlap
    seams(args)
  else:
    args.tile, args.overlap = args.tile or 512, 128 if args.overlap is None else args.overlap
    memory(args)


if __name__ == "__main__":
  main()
