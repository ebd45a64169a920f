"""The convolutions of `configs/fashion_mnist_vdvae.py`, timed alone: XLA:CPU's kernels (as
flaxvae's step runs them: 3x3 as convolutions, 1x1 as dots over channels) against PyTorch's
oneDNN kernels (as its twin runs them, channels_last).

    .venv/bin/python benchmarks/conv_kernels.py                      # jax, flaxvae's XLA flags
    .venv-torch/bin/python benchmarks/conv_kernels.py --impl torch   # oneDNN

Each shape is `kernel:resolution:in:out:count` at batch 64, SAME padding, float32; SHAPES is
every convolution of the config's model with how many times the step runs it (a test derives it
from the model). Prints one JSON line: per shape, the median ms of the forward pass and of the
forward and backward pass (the input's and the kernel's gradients for a fixed random
cotangent), and per kernel size the step's total (each time its count): what the step would
spend on these convolutions run one at a time.
"""

import argparse
import collections
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flaxvae
from flaxvae.runtime import timing

SHAPES = (
  "1:1:8:64:2,1:1:32:16:2,1:1:32:32:14,1:1:32:64:3,1:1:32:80:2,1:1:64:32:5,1:1:128:32:2,"
  "1:4:8:64:3,1:4:32:16:3,1:4:32:64:5,1:4:32:80:3,1:4:64:32:8,1:4:128:32:3,1:8:8:64:4,"
  "1:8:32:16:4,1:8:32:64:7,1:8:32:80:4,1:8:64:32:10,1:8:128:32:4,1:16:8:32:2,1:16:16:16:2,"
  "1:16:16:32:4,1:16:16:48:2,1:16:32:16:5,1:16:64:16:2,1:16:64:32:1,1:32:8:16:4,"
  "1:32:8:32:1,1:32:16:1:1,1:32:16:8:3,1:32:32:8:1,1:32:32:16:1,3:4:32:32:22,3:8:32:32:28,"
  "3:16:16:16:14,3:32:1:16:1,3:32:8:8:8"
)


def model_shapes(config_file="configs/fashion_mnist_vdvae.py"):
  """SHAPES from the model itself: each nnx.Conv by its place (a stacked group runs its layers'
  count of times; a projection sits at the resolution it feeds)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from flaxvae import defaults  # pylint: disable=import-outside-toplevel
  from flaxvae.run import Run  # pylint: disable=import-outside-toplevel

  config = defaults.sibling(config_file, os.path.basename(config_file))
  model = Run(config, abstract=True, image_shape=(28, 28, 1)).model
  resolution = {
    "enc_groups": lambda i: model.enc_spec[i][0],
    "dec_groups": lambda i: model.dec_spec[i][0],
    "enc_proj": lambda i: model.enc_spec[i + 1][0],
    "dec_proj": lambda i: model.dec_spec[i + 1][0],
    "enc_in": lambda _: model.side,
    "to_output": lambda _: model.side,
  }
  counts = collections.Counter()
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Conv):
      shape = node.kernel.get_value().shape
      count = shape[0] if len(shape) == 5 else 1
      res = resolution[path[0]](path[1] if len(path) > 1 else None)
      counts[(shape[-3], res, shape[-2], shape[-1])] += count
  return ",".join(":".join(str(v) for v in (*key, n)) for key, n in sorted(counts.items()))


def median_ms(run, repeats=20, rounds=7):
  """Median ms of one call of `run` (which waits for its result) over `rounds` windows."""
  return 1000 * timing.time_calls(run, windows=rounds, calls_per_window=repeats).median_s()


def jax_timers(batch, kernel, res, cin, cout):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  x = jax.random.normal(jax.random.key(0), (batch, res, res, cin))
  w = jax.random.normal(jax.random.key(1), (kernel, kernel, cin, cout)) * 0.1
  cotangent = jax.random.normal(jax.random.key(2), (batch, res, res, cout))
  if kernel == 1:  # as layers.PointwiseConv runs it
    conv = lambda x, w: jnp.einsum("...c,cd->...d", x, w[0, 0])
  else:
    conv = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
  forward = jax.jit(conv)
  both = jax.jit(lambda x, w: jax.vjp(conv, x, w)[1](cotangent))
  return (lambda: jax.block_until_ready(forward(x, w)), lambda: jax.block_until_ready(both(x, w)))


def torch_timers(batch, kernel, res, cin, cout):
  import torch  # pylint: disable=import-outside-toplevel

  torch.set_num_threads(os.cpu_count())
  last = torch.channels_last
  conv = torch.nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False).to(memory_format=last)
  x = torch.randn(batch, cin, res, res).contiguous(memory_format=last).requires_grad_()
  cotangent = torch.randn(batch, cout, res, res).contiguous(memory_format=last)

  def forward():
    with torch.no_grad():
      conv(x)

  def both():
    torch.autograd.grad(conv(x), [x, conv.weight], cotangent)

  return forward, both


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--impl", choices=("jax", "torch"), default="jax")
  parser.add_argument("--shapes", default=SHAPES, help="kernel:resolution:in:out:count,...")
  parser.add_argument("--batch", type=int, default=64)
  args = parser.parse_args()
  if args.impl == "jax":  # the flags flaxvae's own step runs with, before JAX starts
    flaxvae.apply_process_defaults()
  timers = jax_timers if args.impl == "jax" else torch_timers
  rows, totals = [], {}
  for part in args.shapes.split(","):
    kernel, res, cin, cout, count = (int(v) for v in part.split(":"))
    forward, both = timers(args.batch, kernel, res, cin, cout)
    row = dict(
      kernel=kernel,
      resolution=res,
      cin=cin,
      cout=cout,
      count=count,
      forward_ms=round(median_ms(forward), 3),
      forward_backward_ms=round(median_ms(both), 3),
    )
    total = totals.setdefault(f"{kernel}x{kernel}", {"forward_ms": 0.0, "forward_backward_ms": 0.0})
    for key in total:
      total[key] = round(total[key] + count * row[key], 3)
    rows.append(row)
  print(json.dumps(dict(impl=args.impl, batch=args.batch, shapes=rows, step_total=totals)))


if __name__ == "__main__":
  main()
