"""Progress lines: redrawn in place on a terminal, one plain line per update anywhere else."""

import io

from flaxvae import console


class Terminal(io.StringIO):
  def isatty(self):
    return True


def test_off_a_terminal_each_update_is_its_own_line():
  out = io.StringIO()
  progress = console.Progress(100, "step", "steps", stream=out, plain_every_s=0.0)
  for done in (25, 50, 100):
    progress.update(done, "loss 1.00")
  lines = out.getvalue().splitlines()
  assert [l.split(",")[0] for l in lines] == [
    "step 25/100 (25%)",
    "step 50/100 (50%)",
    "step 100/100 (100%)",
  ]
  assert "\r" not in out.getvalue() and lines[-1].endswith("loss 1.00")
  assert "left" in lines[0] and "elapsed" in lines[-1]


def test_off_a_terminal_slow_work_prints_at_most_every_interval():
  out = io.StringIO()
  progress = console.Progress(1000, "examples", stream=out, plain_every_s=3600)
  for done in range(1, 1001):
    progress.update(done)
  assert len(out.getvalue().splitlines()) == 2  # the first update and the end


def test_on_a_terminal_one_line_is_redrawn():
  out = Terminal()
  progress = console.Progress(10, "step", stream=out, redraw_s=0.0)
  for done in range(1, 11):
    progress.update(done)
  text = out.getvalue()
  assert text.count("\r") == 10 and text.count("\n") == 1 and text.endswith("\n")


def test_durations_read_as_time_left():
  assert console._duration(42) == "42s" and console._duration(125) == "2m05s"
  assert console._duration(7260) == "2h01m"
