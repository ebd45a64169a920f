"""The one warm-up-then-time loop that `flaxvae bench` and every script in benchmarks/ use.

A first call compiles, allocates and starts thread pools, so it is timed apart from the steady
state. Steady-state windows wait only on their last call's result: calls queue asynchronously
as they do in a training loop. This module imports nothing but the standard library, so the
PyTorch twins in benchmarks/ (whose environment has no JAX) time themselves with it too.
"""

import dataclasses
import statistics
import time


@dataclasses.dataclass(frozen=True)
class Timing:
  """Seconds of the warm-up calls and of each timed window of `calls_per_window` calls."""

  warmup_s: float
  window_s: tuple
  calls_per_window: int

  def rates(self, units_per_call=1):
    """Units (examples, FLOPs) per second in each window."""
    return [units_per_call * self.calls_per_window / s for s in self.window_s]

  def median_rate(self, units_per_call=1):
    return statistics.median(self.rates(units_per_call))

  def best_rate(self, units_per_call=1):
    """The fastest window: noise on a shared machine only ever slows a window down."""
    return max(self.rates(units_per_call))

  def median_s(self):
    """Median seconds of one call."""
    return statistics.median(self.window_s) / self.calls_per_window


def _done(result):
  return result


def time_calls(
  call, *, wait=_done, warmup=1, windows=1, calls_per_window=None, window_seconds=None, seconds=None
):
  """Runs `call()` `warmup` times, waiting on each result with `wait` (jax.block_until_ready,
  torch's .item(), ...), then times `windows` windows of `calls_per_window` calls, waiting on
  the last result of each.

  `calls_per_window` None: as many calls as fit in `window_seconds` at the warm-up's pace (one
  when neither is given). `seconds`: keep timing windows until that much time has passed (at
  least `windows` of them)."""
  start = time.perf_counter()
  for _ in range(warmup):
    wait(call())
  warmup_s = time.perf_counter() - start
  if calls_per_window is None:
    per_call = warmup_s / max(warmup, 1)
    calls_per_window = max(1, int(window_seconds / max(per_call, 1e-4))) if window_seconds else 1
  window_s, began = [], time.perf_counter()
  while len(window_s) < windows or (seconds and time.perf_counter() - began < seconds):
    start = time.perf_counter()
    for _ in range(calls_per_window):
      result = call()
    wait(result)
    window_s.append(time.perf_counter() - start)
  return Timing(warmup_s, tuple(window_s), calls_per_window)
