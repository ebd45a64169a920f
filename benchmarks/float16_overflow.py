"""Which decoder activations overflow float16, and what bfloat16 does with them (issue 35),
for docs/interop.md.

    .venv/bin/python benchmarks/float16_overflow.py [--channels 128] [--side 64]
        [--factors 1,1000,3000,10000,30000]

The SDXL VAE's decoder overflows float16 in its up blocks; its weights cannot be downloaded
here, so the model is configs/imagenet256_kl_f8.py's layout (the SD/SDXL VAE's) with random
weights whose up-block residual branches are multiplied by each factor
(precision.scale_up_block_branches) until the activations pass float16's 65504. For each
factor: the largest activation per stage in float32, and whether float16 and bfloat16
compute a finite image, with the largest difference from float32's in [0, 1] units.
"""

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flaxvae import defaults, models, settings
from flaxvae.eval import precision
from flaxvae.objectives import likelihoods

LAPLACE = likelihoods.get_likelihood("laplace")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--channels", type=int, default=128)
  parser.add_argument("--side", type=int, default=64)
  parser.add_argument("--factors", default="1,1000,3000,10000,30000")
  args = parser.parse_args()
  config = defaults.load_config_file("configs/imagenet256_kl_f8.py", None)
  config.model.channels = args.channels
  model_settings = settings.resolve_model(config.model)
  shape = (args.side, args.side, 3)
  model = models.create_model(model_settings, image_shape=shape, likelihood=LAPLACE)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  z = jax.random.normal(jax.random.key(0), (1, args.side // 8, args.side // 8, 4))

  @functools.partial(jax.jit, static_argnums=1)
  def decoded(params, dtype):
    abstract = models.create_model(
      model_settings, image_shape=shape, likelihood=LAPLACE, dtype=dtype, abstract=True
    )
    merged = nnx.merge(nnx.split(abstract)[0], params)
    return precision.decoder_activation_maxima(merged, z), merged.likelihood.mean(merged.decode(z))

  print(f"kl-f8 layout, channels {args.channels}, random weights, z ~ N(0, I) {list(z.shape)}")
  rows, stages = [], None
  for factor in (float(f) for f in args.factors.split(",")):
    scaled = precision.scale_up_block_branches(params, factor)
    maxima, reference = decoded(scaled, jnp.float32)
    stages = stages or list(maxima)
    results = [factor, {k: float(v) for k, v in maxima.items()}]
    for dtype in (jnp.float16, jnp.bfloat16):
      image = np.asarray(decoded(scaled, dtype)[1], np.float32)
      finite = bool(np.isfinite(image).all())
      error = float(np.max(np.abs(image - np.asarray(reference)))) if finite else None
      results.append((finite, error))
    rows.append(results)
  print("\n| stage (float32 max abs) | " + " | ".join(f"x{r[0]:g}" for r in rows) + " |")
  print("|---|" + "---|" * len(rows))
  for stage in stages:
    print(f"| {stage} | " + " | ".join(f"{r[1][stage]:.3g}" for r in rows) + " |")
  for i, name in ((2, "float16"), (3, "bfloat16")):
    cells = [f"{r[i][1]:.3g}" if r[i][0] else "inf/nan" for r in rows]
    print(f"| {name}: image max abs diff from float32 | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
