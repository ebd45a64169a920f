"""Stopping a run on SIGTERM/SIGINT without losing work.

The first signal sets a flag; the trainer finishes the dispatch in flight, saves,
waits for the checkpoint to commit and raises `Preempted`, which exits with
status 128 + signum (143 for SIGTERM, 130 for SIGINT). Rerunning the same
command resumes. A second signal exits at once with status 137, as a kill would:
in-flight writes are only ever temporary directories, so the last committed
checkpoint stays the newest one listed.

On several processes every host must stop at the same dispatch, so the
decision comes from Orbax's `reached_preemption` (JAX's preemption sync
service, which owns SIGTERM there) and no handler is installed.
"""

import logging
import os
import signal
import threading

import jax

log = logging.getLogger("flaxvae")

EXIT_FORCED = 137  # second signal: exited at once, nothing saved since the last commit


def exit_status(signum):
  return 128 + signum


class Preempted(SystemExit):
  """Raised after the preemption checkpoint committed; its code is the exit status."""

  def __init__(self, signum, step):
    super().__init__(exit_status(signum))
    self.signum, self.step = signum, step


class Watcher:
  """Answers "should the loop stop now?" after each dispatch."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, manager):
    self.manager, self.signum, self._previous = manager, None, {}
    self._dispatches = 0
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for signum in self.SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)

  def _handle(self, signum, frame):
    if self.signum is not None:
      os.write(2, b"\nsecond signal: exiting now; the last committed checkpoint is kept\n")
      os._exit(EXIT_FORCED)
    self.signum = signum
    log.warning(
      "%s received: finishing the current dispatch, then saving a checkpoint "
      "(send it again to exit at once)",
      signal.Signals(signum).name,
    )

  def should_stop(self, step):
    """True once a signal arrived (or, multi-host, all hosts reached the sync point)."""
    self._dispatches += 1  # the same count on every host: the sync point is per dispatch
    if self.signum is None and self.manager.reached_preemption(self._dispatches):
      self.signum = signal.SIGTERM
    return self.signum is not None

  def close(self):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}
