"""One picture for docs/autoencoders.md's equal-wall-time comparison: the same test images,
then each run's reconstruction from its posterior mean (the image its PSNR, SSIM, LPIPS and rFID
score), one row per run, and the table of those runs' eval.json figures in markdown.

  .venv/bin/python benchmarks/quality_grid.py --out docs/figures/fashion_mnist_autoencoders.png \
      --runs "L1 + KL=runs/quality/l1,+ LPIPS=runs/quality/lpips,+ LPIPS + GAN=runs/quality/gan,\
conv VAE (ELBO)=runs/quality/conv"
"""

import json
import os

import numpy as np
from absl import app, flags

import flaxvae
from flaxvae.eval import reconstruction
from flaxvae.train import outputs

flags.DEFINE_string("runs", None, "LABEL=WORKDIR,... in row order", required=True)
flags.DEFINE_string("out", "docs/figures/fashion_mnist_autoencoders.png", "the PNG to write")
flags.DEFINE_integer("columns", 12, "test images shown")
FLAGS = flags.FLAGS

FIGURES = ("step", "psnr", "ssim", "lpips", "rfid", "rate")


def main(_):
  runs = [part.split("=", 1) for part in FLAGS.runs.split(",")]
  rows, table = [], []
  for label, workdir in runs:
    model = flaxvae.load(workdir)
    images = model.run.eval_images[: FLAGS.columns]
    x, recon = reconstruction.mean_reconstructions(model.run, model.params, images)
    rows += [x] if not rows else []
    rows.append(recon)
    with open(os.path.join(workdir, "eval.json")) as f:
      found = json.load(f)
    table.append((label, found))
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  outputs.save_image_grid(FLAGS.out, np.concatenate(rows), FLAGS.columns)
  print(f"written: {FLAGS.out} (rows: originals, then {', '.join(label for label, _ in runs)})")
  print("| run | " + " | ".join(FIGURES) + " |")
  print("|---" * (len(FIGURES) + 1) + "|")
  for label, found in table:
    cells = [
      f"{found[k]:.4g}" if isinstance(found.get(k), float) else str(found.get(k)) for k in FIGURES
    ]
    print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  app.run(main)
