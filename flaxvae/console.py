"""Progress lines on the console, from process 0 only.

On a terminal one line is redrawn in place (carriage return); anywhere else (CI logs, SLURM,
`make run > log`) each update is its own plain line, since carriage returns would glue every
update into one line there. Long work (training, the final evaluation, preparing data, the
amortization-gap optimisation) reports done/total, its rate and the time left.
"""

import sys
import time

import jax


def _duration(seconds):
  seconds = int(round(seconds))
  if seconds < 60:
    return f"{seconds}s"
  if seconds < 3600:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
  """`update(done, note)` prints `label done/total (pct) rate unit/s, time left` with `note`.

  On a terminal updates are redrawn at most every `redraw_s`; elsewhere a line is printed
  when `plain_every_s` has passed since the last one (0: every update), and always at the end.
  """

  def __init__(
    self, total, label, unit="", *, stream=None, plain_every_s=10.0, redraw_s=0.2, start_done=0
  ):
    self.total, self.label, self.unit = total, label, unit
    self.stream = stream or sys.stdout
    self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
    self.plain_every_s, self.redraw_s = plain_every_s, redraw_s
    self.enabled = jax.process_index() == 0
    self.start, self.start_done, self._last_print, self._open_line = (
      time.perf_counter(),
      start_done,
      float("-inf"),
      False,
    )

  def update(self, done, note=""):
    if not self.enabled:
      return
    now = time.perf_counter()
    finished = done >= self.total
    interval = self.redraw_s if self.tty else self.plain_every_s
    if not finished and now - self._last_print < interval:
      return
    self._last_print = now
    elapsed = now - self.start
    rate = (done - self.start_done) / elapsed if elapsed > 0 else 0.0
    left = (self.total - done) / rate if rate > 0 else float("nan")
    parts = [f"{self.label} {done:,}/{self.total:,} ({100 * done / max(self.total, 1):.0f}%)"]
    if rate > 0:
      parts.append(f"{rate:,.1f} {self.unit}/s".replace(" /s", "/s"))
      parts.append(f"elapsed {_duration(elapsed)}" if finished else f"{_duration(left)} left")
    if note:
      parts.append(note)
    text = ", ".join(parts)
    if self.tty:
      self.stream.write("\r\033[K" + text + ("\n" if finished else ""))
      self._open_line = not finished
    else:
      self.stream.write(text + "\n")
    self.stream.flush()

  def close(self):
    """Ends a redrawn line that did not reach the total (an error, a preemption)."""
    if self.enabled and self.tty and self._open_line:
      self.stream.write("\n")
      self.stream.flush()
      self._open_line = False
