"""Runs per-example functions over a split, spread over all devices.

`fn(params, rng, rows, example_ids) -> {name: [batch, ...]}` is written per device (see
diagnostics.py); the evaluator pads the last batch (a request for fewer examples than a batch
gets a batch of their size), keeps at most two dispatches queued on the devices, drops the
padding and returns numpy arrays over the examples.
"""

import math
from typing import Any

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
    self._compiled: dict[Any, Any] = {}

  def batch_for(self, num_examples=None):
    """The global batch that evaluates `num_examples` (None: the whole split): batch_size, or
    fewer rows (a multiple of the device count) when that covers them, so a small request
    computes no padding."""
    num_examples = min(num_examples or len(self.images), len(self.images))
    devices = self.runner.num_devices
    return min(self.batch_size, max(1, math.ceil(num_examples / devices)) * devices)

  def per_example(
    self,
    name,
    fn,
    params,
    rng,
    num_examples=None,
    rows=None,
    progress=None,
    chunks=0,
    fold=None,
    reduce=None,
  ):
    """fn over the first `num_examples` (all if None) of the split, or of `rows` if given.

    `progress` (a label) prints examples done, rate and time left as batches finish. With
    `chunks` > 0, fn takes a fifth argument, the chunk index, and runs once per chunk and
    batch (the loop on the host, not the device); `fold(total, part, chunk_index)` merges each
    chunk's output into the batch's running total on the devices as it is dispatched (total is
    None at the first chunk), so memory stays that of one total whatever the number of chunks,
    and `reduce` turns a batch's total, on the host, into per-example values.
    """
    source = self.images if rows is None else rows
    n = len(source) if not num_examples else min(num_examples, len(source))
    batch_size = self.batch_for(n)
    if name not in self._compiled:
      R, batch = parallel.REPLICATED, parallel.batch_axis(0)
      self._compiled[name] = self.runner.wrap(
        fn, (R, R, batch, batch) + ((R,) if chunks else ()), (batch,)
      )
    compiled = self._compiled[name]
    params, rng = self.runner.put((params, rng))
    outputs = []
    local = batch_size // jax.process_count()
    in_flight = dispatch.InFlight(self.runner.wait_timeout_s, what=f"evaluation ({name})")
    shown = console.Progress(n, progress, "examples") if progress else None
    for start in range(0, n, batch_size):
      ids = np.arange(start, start + batch_size)
      ids = np.where(ids < n, ids, 0).astype(np.int32)
      ids = ids[jax.process_index() * local : (jax.process_index() + 1) * local]
      images, ids = self.runner.put((source[ids], ids), parallel.batch_axis(0))
      if chunks:
        total = None
        for c in range(chunks):
          part = compiled(params, rng, images, ids, self.runner.put(np.int32(c)))
          total = fold(total, part, c)
          in_flight.add(part)  # not the total: the next fold consumes it
        outputs.append(total)
      else:
        outputs.append(compiled(params, rng, images, ids))
        in_flight.add(outputs[-1])  # returns once the batch before last is done
      if shown and start > batch_size:  # every batch before the last two is done
        shown.update(start - batch_size)
    if chunks:
      outputs = [reduce(self.runner.gather(total)) for total in outputs]
    else:
      outputs = [self.runner.gather(o) for o in outputs]
    if shown:
      shown.update(n)
    return jax.tree.map(lambda *xs: np.concatenate(xs)[:n], *outputs)
