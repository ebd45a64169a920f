"""The 3x3 convolutions of `configs/fashion_mnist_vdvae.py`, timed alone: XLA:CPU's kernels
(as flaxvae's step runs them) against PyTorch's oneDNN kernels (as its twin runs them).

    .venv/bin/python benchmarks/conv_kernels.py                      # jax, flaxvae's XLA flags
    .venv-torch/bin/python benchmarks/conv_kernels.py --impl torch   # oneDNN, channels_last

Each shape is `resolution:channels:count`, batch 64, SAME padding, float32. The defaults are
the VDVAE config's bottleneck convolutions (two per block at resolutions above 2x2; blocks per
resolution: encoder blocks + 3 per decoder layer (posterior, prior, residual), with the
bottleneck's channels): 32x32 8 channels x 8, 16x16 16 x 14, 8x8 32 x 28, 4x4 32 x 22.
Prints one JSON line: per shape, the median ms of the forward pass and of the forward and
backward pass (the input's and the kernel's gradients for a fixed random cotangent), and the
whole step's total (each time the count): what the step would spend on these convolutions run one at a time.
"""
import argparse
import json
import os
import statistics
import time

SHAPES = "32:8:8,16:16:14,8:32:28,4:32:22"


def median_ms(run, repeats=20, rounds=7):
  run()
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(repeats):
      run()
    times.append((time.perf_counter() - start) / repeats * 1000)
  return statistics.median(times)


def jax_timers(batch, res, channels):
  from flaxvae.runtime import xla_flags  # pylint: disable=import-outside-toplevel
  xla_flags.apply_defaults()  # the flags flaxvae's own step runs with
  import jax  # pylint: disable=import-outside-toplevel
  x = jax.random.normal(jax.random.key(0), (batch, res, res, channels))
  w = jax.random.normal(jax.random.key(1), (3, 3, channels, channels)) * 0.1
  cotangent = jax.random.normal(jax.random.key(2), x.shape)
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  forward = jax.jit(conv)
  both = jax.jit(lambda x, w: jax.vjp(conv, x, w)[1](cotangent))
  return (lambda: jax.block_until_ready(forward(x, w)),
          lambda: jax.block_until_ready(both(x, w)))


def torch_timers(batch, res, channels):
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(os.cpu_count())
  last = torch.channels_last
  conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(memory_format=last)
  x = torch.randn(batch, channels, res, res).contiguous(memory_format=last).requires_grad_()
  cotangent = torch.randn_like(x)

  def forward():
    with torch.no_grad():
      conv(x)

  def both():
    torch.autograd.grad(conv(x), [x, conv.weight], cotangent)
  return forward, both


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--impl", choices=("jax", "torch"), default="jax")
  parser.add_argument("--shapes", default=SHAPES, help="resolution:channels:count,...")
  parser.add_argument("--batch", type=int, default=64)
  args = parser.parse_args()
  timers = jax_timers if args.impl == "jax" else torch_timers
  rows, total = [], {"forward_ms": 0.0, "forward_backward_ms": 0.0}
  for part in args.shapes.split(","):
    res, channels, count = (int(v) for v in part.split(":"))
    forward, both = timers(args.batch, res, channels)
    row = dict(resolution=res, channels=channels, count=count,
               forward_ms=round(median_ms(forward), 3),
               forward_backward_ms=round(median_ms(both), 3))
    for key in total:
      total[key] += count * row[key]
    rows.append(row)
  print(json.dumps(dict(impl=args.impl, batch=args.batch, shapes=rows,
                        step_total={k: round(v, 1) for k, v in total.items()})))


if __name__ == "__main__":
  main()
