"""log p(x) of a trained 2-D-latent model by dense quadrature, beside its AIS and IWAE estimates.

    .venv/bin/flaxvae train --config configs/fashion_mnist_mlp.py --workdir runs/mlp2d \\
        --config.model.latent_dim=2 --config.num_steps=1500
    .venv/bin/python benchmarks/quadrature_2d.py --workdir runs/mlp2d [--images 12]

With two latent dimensions p(x) = integral p(x|z) p(z) dz can be computed on a grid: here a
midpoint rule over [-R, R]^2 with G x G cells (default R = 7, G = 1001: cells of 0.014; the
prior's mass outside the square is below 1e-10), in float64 logsumexp. The posterior of a
trained decoder can be multimodal, which is where IWAE with q(z|x) as its proposal goes wrong;
AIS (flaxvae's eval.log_px_estimator=ais) should agree with the grid. Prints one JSON line per
image and a summary line.
"""

import argparse
import json
import math
import time

import flaxvae

flaxvae.apply_process_defaults()  # the XLA flags `flaxvae` runs with, before JAX starts

import jax
import numpy as np


def quadrature(model, x, radius, cells):
  """log p(x) per image by the midpoint rule on a cells x cells grid over [-radius, radius]^2."""
  edges = np.linspace(-radius, radius, cells + 1)
  centres = (edges[:-1] + edges[1:]) / 2
  log_cell = 2 * math.log(edges[1] - edges[0])
  z1, z2 = np.meshgrid(centres, centres, indexing="ij")
  grid = np.stack([z1.ravel(), z2.ravel()], -1).astype(np.float32)
  log_prior = -0.5 * np.sum(grid.astype(np.float64) ** 2, -1) - math.log(2 * math.pi)
  out = []
  for xi in x:
    parts = []
    for start in range(0, len(grid), 65536):
      z = grid[start : start + 65536]
      xs = np.broadcast_to(xi, (len(z), *xi.shape))
      parts.append(np.asarray(model.log_likelihood(xs, z), np.float64))
    log_joint = np.concatenate(parts) + log_prior + log_cell
    m = log_joint.max()
    out.append(m + math.log(np.exp(log_joint - m).sum()))
  return np.asarray(out)


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--images", type=int, default=12)
  parser.add_argument("--radius", type=float, default=7.0)
  parser.add_argument("--cells", type=int, default=1001)
  parser.add_argument("--iwae_samples", type=int, default=5000)
  parser.add_argument("--ais_chains", type=int, default=16)
  parser.add_argument("--ais_steps", type=int, default=1000)
  args = parser.parse_args()
  model = flaxvae.load(args.workdir)
  if model.latent_shapes != ((2,),):
    raise SystemExit(
      f"{args.workdir} has latents {model.latent_shapes}: quadrature needs one 2-D layer"
    )
  x = flaxvae.load_dataset(args.workdir, model.config.data.eval_split)[: args.images]
  start = time.perf_counter()
  exact = quadrature(model, x, args.radius, args.cells)
  quad_s = time.perf_counter() - start
  start = time.perf_counter()
  iwae = np.asarray(model.log_marginal(x, jax.random.key(0), args.iwae_samples))
  iwae_s = time.perf_counter() - start
  start = time.perf_counter()
  ais = np.asarray(
    model.log_marginal(
      x, jax.random.key(1), args.ais_chains, estimator="ais", ais_steps=args.ais_steps
    )
  )
  ais_s = time.perf_counter() - start
  for i in range(len(x)):
    print(
      json.dumps(
        dict(
          image=i,
          quadrature=round(float(exact[i]), 4),
          iwae=round(float(iwae[i]), 4),
          ais=round(float(ais[i]), 4),
        )
      )
    )
  print(
    json.dumps(
      dict(
        workdir=args.workdir,
        images=len(x),
        grid=f"{args.cells}^2 over +-{args.radius}",
        iwae_samples=args.iwae_samples,
        ais_chains=args.ais_chains,
        ais_steps=args.ais_steps,
        mean_abs_error_iwae=round(float(np.mean(np.abs(iwae - exact))), 4),
        max_abs_error_iwae=round(float(np.max(np.abs(iwae - exact))), 4),
        mean_abs_error_ais=round(float(np.mean(np.abs(ais - exact))), 4),
        max_abs_error_ais=round(float(np.max(np.abs(ais - exact))), 4),
        seconds=dict(quadrature=round(quad_s, 1), iwae=round(iwae_s, 1), ais=round(ais_s, 1)),
      )
    )
  )


if __name__ == "__main__":
  main()
