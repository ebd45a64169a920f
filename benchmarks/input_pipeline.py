"""Examples/s each input pipeline delivers to the devices, with and without training.

    .venv/bin/python benchmarks/input_pipeline.py --config configs/fashion_mnist_mlp.py
        [--seconds 5] [--with_training]

Prints one JSON line: examples/s of the in-memory feed (indices plus the on-device gather) and
of the streaming feed, and with --with_training the end-to-end train examples/s on each path
and on synthetic device-resident batches (the ceiling any input pipeline can reach).
"""

import os
import sys

import flaxvae

if __name__ == "__main__":  # before JAX starts: the process defaults `flaxvae` runs with
  flaxvae.apply_process_defaults(malloc=True)

import json

import jax
from absl import flags

from flaxvae import bench
from flaxvae import data as data_lib
from flaxvae.data import feeds
from flaxvae.run import Run
from flaxvae.runtime import parallel, timing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cases


def bench_input(config, seconds=5.0, dispatch_steps=None):
  """{path: examples/s} of feeding config's train split to the devices, without training.

  Each path runs whole dispatches of `dispatch_steps` (default config.steps_per_dispatch) batches
  and waits until the batch is on device (in_memory: the indices plus the on-device gather).
  """
  runner = parallel.create_runner(config.parallel, config.batch_size)
  dataset = data_lib.open_dataset(config.data)
  n = dispatch_steps or config.steps_per_dispatch
  split = dataset.open_split(config.data.train_split)
  images = split.read_all()
  gather = jax.jit(lambda data, idx: data[idx])
  options = dict(
    seed=config.seed,
    batch_size=config.batch_size,
    read_threads=config.data.read_threads,
    prefetch_batches=config.data.prefetch_batches,
  )

  def measure(produce):  # the warm-up call compiles and starts the feed's threads
    measured = timing.time_calls(produce, wait=jax.block_until_ready, windows=0, seconds=seconds)
    return len(measured.window_s) * n * config.batch_size / sum(measured.window_s)

  results = {}
  feed = feeds.create_feed(images, runner, **options)
  results["in_memory"] = measure(lambda: gather(*feed.args(n)))
  del feed
  feed = feeds.create_feed(split, runner, **options)
  results["streaming"] = measure(lambda: feed.args(n))
  results.update(
    dataset=config.data.name,
    examples=split.num_examples,
    image_shape=list(split.image_shape),
    batch_size=config.batch_size,
    steps_per_dispatch=n,
    read_threads=config.data.read_threads,
    default_pipeline=data_lib.choose_pipeline(config.data, dataset, config.data.train_split),
  )
  return results


def bench_training(config, dispatches=3):
  """End-to-end train examples/s with each path and with synthetic device-resident batches.

  "synthetic" reuses one uint8 dispatch of batches already on device: the ceiling any input
  pipeline can reach. Each path runs `dispatches` whole dispatches after one for compilation.
  """
  n, results = config.steps_per_dispatch, {}
  for path in ("synthetic", "in_memory", "streaming"):
    c = bench.with_keys(config, **{"data.pipeline": "in_memory" if path == "synthetic" else path})
    run = Run(c)
    feed = run.create_feed()
    if path == "synthetic":
      data = run.train_images
      batches = data[: n * c.batch_size].reshape(n, c.batch_size, *data.shape[1:])
      fixed = (run.runner.put(batches[:, feed.lo : feed.hi], parallel.batch_axis(1)),)
      fn, next_args = run.train_fn("batches"), lambda fixed=fixed: fixed
    else:
      fn = run.train_fn("indices" if feed.gathers else "batches")
      next_args = lambda feed=feed: feed.args(n)
    state = run.runner.put(run.initial_state())

    def dispatch(fn=fn, next_args=next_args):
      nonlocal state
      state, metrics = fn(state, *next_args())  # async: the next args are made meanwhile
      return metrics

    results[path] = timing.time_calls(
      dispatch, wait=jax.block_until_ready, calls_per_window=dispatches
    ).median_rate(n * c.batch_size)
  for path in ("in_memory", "streaming"):
    results[f"{path}_fraction_of_synthetic"] = results[path] / results["synthetic"]
  return results


def main(argv):
  def define(fv):
    flags.DEFINE_float("seconds", 5.0, "time per pipeline", flag_values=fv)
    flags.DEFINE_boolean(
      "with_training",
      False,
      "also train end to end on each path and on synthetic device-resident batches",
      flag_values=fv,
    )

  fv = cases.parse_flags(argv, define, __doc__)
  result = bench_input(fv.config, fv.seconds)
  if fv.with_training:
    result["training_examples_per_s"] = bench_training(fv.config)
  print(json.dumps(result))


if __name__ == "__main__":
  main(sys.argv)
