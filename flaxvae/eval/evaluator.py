"""Runs per-example functions over a split, spread over all devices.

`fn(params, rng, rows, example_ids) -> {name: [batch, ...]}` is written per device (see
diagnostics.py); the evaluator pads the last batch, keeps at most two batches queued on the
devices, drops the padding and returns numpy arrays over the examples.
"""
import math

import jax
import numpy as np

from flaxvae import console
from flaxvae.runtime import dispatch, parallel


class Evaluator:
  """Per-example functions over (a prefix of) a split held on the host."""

  def __init__(self, runner: parallel.Runner, images, batch_size):
    self.runner, self.images = runner, images
    per_device = max(1, math.ceil(batch_size / runner.num_devices))
    self.batch_size = per_device * runner.num_devices
    self._compiled = {}

  def per_example(self, name, fn, params, rng, num_examples=None, rows=None, progress=None,
                  chunks=0, reduce=None):
    """fn over the first `num_examples` (all if None) of the split, or of `rows` if given.

    `progress` (a label) prints examples done, rate and time left as batches finish. With
    `chunks` > 0, fn takes a fifth argument, the chunk index, and runs once per chunk and
    batch (the loop on the host, not the device); `reduce` merges a batch's chunk outputs.
    """
    source = self.images if rows is None else rows
    n = len(source) if not num_examples else min(num_examples, len(source))
    if name not in self._compiled:
      R, batch = parallel.REPLICATED, parallel.batch_axis(0)
      self._compiled[name] = self.runner.wrap(fn, (R, R, batch, batch) + ((R,) if chunks else ()),
                                              (batch,))
    compiled = self._compiled[name]
    params, rng = self.runner.put((params, rng))
    outputs = []
    local = self.batch_size // jax.process_count()
    in_flight = dispatch.InFlight(self.runner.wait_timeout_s, what=f"evaluation ({name})")
    shown = console.Progress(n, progress, "examples") if progress else None
    for start in range(0, n, self.batch_size):
      ids = np.arange(start, start + self.batch_size)
      ids = np.where(ids < n, ids, 0).astype(np.int32)
      ids = ids[jax.process_index() * local:(jax.process_index() + 1) * local]
      images, ids = self.runner.put((source[ids], ids), parallel.batch_axis(0))
      if chunks:
        parts = []
        for c in range(chunks):
          parts.append(compiled(params, rng, images, ids, self.runner.put(np.int32(c))))
          in_flight.add(parts[-1])
        outputs.append(parts)
      else:
        outputs.append(compiled(params, rng, images, ids))
        in_flight.add(outputs[-1])  # returns once the batch before last is done
      if shown and start > self.batch_size:  # every batch before the last two is done
        shown.update(start - self.batch_size)
    if chunks:
      outputs = [reduce([self.runner.gather(p) for p in parts]) for parts in outputs]
    else:
      outputs = [self.runner.gather(o) for o in outputs]
    if shown:
      shown.update(n)
    return jax.tree.map(lambda *xs: np.concatenate(xs)[:n], *outputs)
