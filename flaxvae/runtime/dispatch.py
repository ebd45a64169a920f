"""Waiting on device work from the host: a bounded number of dispatches in flight, and waits
that end with a clear error instead of hanging, and that let signal handlers run.

Why a bound: JAX dispatches asynchronously, so a loop that never reads a result queues
programs without limit. XLA:CPU runs each simulated device's part of a program on a shared
thread pool; with tens of multi-device programs queued, the participants of one all-reduce
no longer all get a thread, the rendezvous times out and the process aborts (8 devices: 16
queued one-step dispatches ran, 32 aborted). Two in flight keep the devices busy (one runs
while the next waits) and the host idle-waits on the older one.

Why a helper thread: a main thread blocked inside the runtime (`block_until_ready`,
`np.asarray`) never runs Python signal handlers, so neither preemption nor the "second
signal exits at once" promise would work while the host waits. The wait happens on a
daemon thread; the main thread sleeps on a lock, which signals interrupt.
"""

import collections
import queue
import threading
import time

import jax

from flaxvae.errors import DeviceTimeout

MAX_IN_FLIGHT = 2


class _Waiter:
  """One daemon thread that blocks on device arrays for the main thread."""

  def __init__(self):
    self._requests = queue.SimpleQueue()
    self._thread = None

  def _loop(self):
    while True:
      tree, done, errors = self._requests.get()
      try:
        jax.block_until_ready(tree)
      except BaseException as e:  # handed to the waiting thread
        errors.append(e)
      done.set()

  def wait(self, tree, timeout_s):
    if self._thread is None:
      self._thread = threading.Thread(target=self._loop, name="flaxvae-device-wait", daemon=True)
      self._thread.start()
    done, errors = threading.Event(), []
    self._requests.put((tree, done, errors))
    if not done.wait(timeout_s):  # the lock wait is interrupted by signals: handlers run
      return False
    if errors:
      raise errors[0]
    return True


_WAITER = _Waiter()


def _pending(tree):
  return [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array) and not x.is_ready()]


def wait(tree, timeout_s, what="device work"):
  """Blocks until every array in `tree` is computed; DeviceTimeout after `timeout_s` seconds
  (None: no limit; signal handlers still run while it waits)."""
  pending = _pending(tree)
  if not pending:
    return tree
  start = time.monotonic()
  if not _WAITER.wait(pending, timeout_s):
    raise DeviceTimeout(
      f"{what} did not finish within {timeout_s:.0f} s (after {time.monotonic() - start:.0f} s "
      "of waiting): a collective is probably stuck (a process died or stopped, or devices "
      "deadlocked). Rerun the same command to resume from the last committed checkpoint; if "
      "single dispatches legitimately take longer, raise parallel.wait_timeout_s"
    )
  return tree


class InFlight:
  """Keeps at most `limit` dispatches queued on the devices; the host waits on the oldest."""

  def __init__(self, timeout_s, limit=MAX_IN_FLIGHT, what="a train dispatch"):
    self.timeout_s, self.limit, self.what = timeout_s, limit, what
    self._queue = collections.deque()

  def add(self, outputs):
    """Registers a dispatch's outputs; waits on older dispatches beyond the limit."""
    self._queue.append(outputs)
    while len(self._queue) > self.limit:
      wait(self._queue.popleft(), self.timeout_s, self.what)

  def drain(self):
    while self._queue:
      wait(self._queue.popleft(), self.timeout_s, self.what)
