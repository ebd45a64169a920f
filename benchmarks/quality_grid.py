"""One picture for docs/autoencoders.md's equal-wall-time comparison: the same test images,
then each run's reconstruction from its posterior mean (the image its PSNR, SSIM, LPIPS and rFID
score), one row per run, and the table of those runs' eval.json figures in markdown.

  .venv/bin/python benchmarks/quality_grid.py --out docs/figures/fashion_mnist_autoencoders.png \
      --runs "L1 + KL=runs/quality/l1,+ LPIPS=runs/quality/lpips,+ LPIPS + GAN=runs/quality/gan,\
conv VAE (ELBO)=runs/quality/conv"
"""

import json
import os

import jax.numpy as jnp
import numpy as np
from absl import app, flags

import flaxvae
from flaxvae.data import protocols
from flaxvae.eval import reconstruction
from flaxvae.train import outputs

flags.DEFINE_string("runs", None, "LABEL=WORKDIR,... in row order", required=True)
flags.DEFINE_string("out", "docs/figures/fashion_mnist_autoencoders.png", "the PNG to write")
flags.DEFINE_integer("columns", 12, "test images shown")
FLAGS = flags.FLAGS

FIGURES = ("step", "psnr", "ssim", "lpips", "rfid", "rate")


def reconstructions_of(model, count):
  """The first `count` test images (as evaluation reads them) and their reconstructions."""
  run = model.run
  images = run.eval_images[:count]
  x = protocols.eval_targets(jnp.asarray(images), jnp.arange(count), run.protocol)
  return np.asarray(x), np.asarray(reconstruction._reconstruct_jit(run.graphdef, model.params, x))


def main(_):
  runs = [part.split("=", 1) for part in FLAGS.runs.split(",")]
  rows, table = [], []
  for label, workdir in runs:
    x, recon = reconstructions_of(flaxvae.load(workdir), FLAGS.columns)
    rows += [x] if not rows else []
    rows.append(recon)
    with open(os.path.join(workdir, "eval.json")) as f:
      found = json.load(f)
    table.append((label, workdir, found))
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  outputs.save_image_grid(FLAGS.out, np.concatenate(rows), FLAGS.columns)
  print(f"written: {FLAGS.out} (rows: originals, then {', '.join(label for label, _ in runs)})")
  print("| run | " + " | ".join(FIGURES) + " |")
  print("|---" * (len(FIGURES) + 1) + "|")
  for label, _, found in table:
    cells = [
      f"{found[k]:.4g}" if isinstance(found.get(k), float) else str(found.get(k)) for k in FIGURES
    ]
    print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  app.run(main)
