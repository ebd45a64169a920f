"""The damage battery: what a crash, a kill or a second writer leaves behind never breaks a command.

For each command (a resumed `flaxvae train`, `evaluate`, `sample`, `report`, `flaxvae.load`)
and each damage to a finished workdir, the outcome is a fallback with a warning, or one line
with exit status 2: never a traceback, and never a checkpoint that was readable before
deleted or changed. The table (DAMAGES x COMMANDS -> OUTCOMES) shows in the test ids, e.g.
`test_battery[truncated_newest-evaluate]`. One tiny run (on-disk `tiny` data, so the readers
reopen it by name) is trained once; every case damages a copy.

The lock's own cases follow: a real second process holding it, a holder killed with SIGKILL,
another host's old and recent heartbeats, a reused pid, a multi-process job.
"""

import json
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest
from tensorboardX.proto import event_pb2

import flaxvae
from flaxvae import cli
from flaxvae.errors import FlaxvaeError
from flaxvae.train import outputs, workdir_lock
from flaxvae.train.trainer import train
from tests import conftest

NEWEST, OLDER = 12, 6
COMMANDS = ("train", "evaluate", "sample", "report", "load")


def run_config(data_dir):
  return conftest.tiny_config(
    **{
      "data.name": "tiny",
      "data.data_dir": str(data_dir),
      "data.pipeline": "in_memory",
      "eval.every_steps": OLDER,
    }
  )


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, tiny_data_dir):
  """The run's config as a file, for `flaxvae train --config`."""
  path = tmp_path_factory.mktemp("config") / "tiny_run.py"
  path.write_text(
    f"import sys\nsys.path.insert(0, {str(conftest.REPO)!r})\n"
    "from tests.train.test_damage import run_config\n"
    f"def get_config():\n  return run_config({str(tiny_data_dir)!r})\n"
  )
  return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_data_dir, compilation_cache):
  """A finished tiny run: checkpoints 6 and 12, evaluations at 6 and (final) 12."""
  workdir = tmp_path_factory.mktemp("finished") / "run"
  train(run_config(tiny_data_dir), str(workdir))
  assert sorted(os.listdir(workdir / "checkpoints"), key=int) == [str(OLDER), str(NEWEST)]
  return workdir


# -- damages --------------------------------------------------------------------------------
def truncate_largest(step_dir):
  path = max(
    (p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
  )
  with open(path, "r+b") as f:
    f.truncate(path.stat().st_size // 2)


def hold_lock(workdir):
  """A real second process holding the workdir's lock until it is killed."""
  proc = subprocess.Popen(
    [
      sys.executable,
      "-c",
      (
        f"import sys, time\nsys.path.insert(0, {str(conftest.REPO)!r})\n"
        "from flaxvae.train import workdir_lock\n"
        f"workdir_lock.WorkdirLock({str(workdir)!r}).acquire()\n"
        "print('held', flush=True)\ntime.sleep(600)\n"
      ),
    ],
    stdout=subprocess.PIPE,
    text=True,
  )
  assert proc.stdout.readline().strip() == "held"
  return proc


DAMAGES = {
  "truncated_newest": lambda w: truncate_largest(w / "checkpoints" / str(NEWEST)),
  "state_metadata_missing": lambda w: (
    w / "checkpoints" / str(NEWEST) / "state" / "_METADATA"
  ).unlink(),
  "config_item_missing": lambda w: shutil.rmtree(w / "checkpoints" / str(NEWEST) / "config"),
  "empty_step_folder": lambda w: (w / "checkpoints" / "18").mkdir(),
  "every_checkpoint_unreadable": lambda w: [
    truncate_largest(w / "checkpoints" / str(s)) for s in (OLDER, NEWEST)
  ],
  "config_json_garbage": lambda w: (w / "config.json").write_text("{'not': json"),
  "config_json_missing": lambda w: (w / "config.json").unlink(),
  "eval_json_missing": lambda w: (w / "eval.json").unlink(),
  "eval_json_garbage": lambda w: (w / "eval.json").write_text('{"step": 12, "log_px"'),
  "metrics_torn": lambda w: open(w / "metrics.jsonl", "a").write('{"step": 6500, "loss": 12'),
  "metrics_empty": lambda w: (w / "metrics.jsonl").write_text(""),
  "second_writer": hold_lock,
}

OK = (0, None)
# damage -> command -> (exit status, a text stderr must hold). Commands not named: OK.
OUTCOMES = {
  "truncated_newest": dict.fromkeys(
    ("train", "evaluate", "sample", "load"), (0, f"step {NEWEST} in")
  ),
  "state_metadata_missing": dict.fromkeys(
    ("train", "evaluate", "sample", "load"), (0, "lacks its _METADATA file")
  ),
  "config_item_missing": dict.fromkeys(
    ("train", "evaluate", "sample", "load"), (0, "item(s) config missing")
  ),
  "empty_step_folder": dict.fromkeys(
    ("train", "evaluate", "sample", "load"), (0, "(its folder is empty); falling back to step 12")
  ),
  "every_checkpoint_unreadable": {
    "train": (0, "no earlier checkpoint: starting from scratch"),
    **dict.fromkeys(("evaluate", "sample", "load"), (2, "no readable checkpoint in")),
  },
  "eval_json_garbage": {"report": (0, "eval.json is unreadable")},
  "metrics_torn": {
    "train": (0, "is not a complete JSON row (a write cut short by a kill?): dropped"),
    "report": (0, "is not a complete JSON row (a write cut short by a kill?): skipped"),
  },
  "second_writer": {"train": (2, "is in use by another flaxvae train: process")},
}


def run_command(command, workdir, config_file, capsys, caplog):
  """(exit status, what it printed on stderr and logged) of `command` on `workdir`, run in
  this process."""
  capsys.readouterr()
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    if command == "load":
      try:
        flaxvae.load(str(workdir))
        status = 0
      except FlaxvaeError as e:
        print(f"flaxvae.load: error: {e}", file=sys.stderr)
        status = e.exit_status
    else:
      args = {
        "train": ["--config", str(config_file)],
        "evaluate": ["--max_examples=8"],
        "sample": ["--n=4"],
        "report": [],
      }[command]
      status = cli.main(["flaxvae", command, f"--workdir={workdir}", *args])
  logged = "".join(f"{r.getMessage()}\n" + (r.exc_text or "") for r in caplog.records)
  return status, logged + capsys.readouterr().err


def intact_steps(workdir, finished):
  """{step folder: digest} of the checkpoints the damage left as they were (so readable)."""
  found = {}
  for name in os.listdir(workdir / "checkpoints"):
    digest = conftest.tree_digest(workdir / "checkpoints" / name)
    if (
      name.isdigit()
      and (finished / "checkpoints" / name).is_dir()
      and digest == conftest.tree_digest(finished / "checkpoints" / name)
    ):
      found[name] = digest
  return found


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("damage", DAMAGES)
def test_battery(damage, command, finished, config_file, tmp_path, capsys, caplog):
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  holder = DAMAGES[damage](workdir)
  readable = intact_steps(workdir, finished)
  before = conftest.tree_digest(workdir / "checkpoints")
  try:
    status, err = run_command(command, workdir, config_file, capsys, caplog)
  finally:
    if isinstance(holder, subprocess.Popen):
      holder.kill()
      holder.wait()
  expected_status, expected_text = OUTCOMES.get(damage, {}).get(command, OK)
  assert "Traceback" not in err, err
  assert status == expected_status, err
  if expected_text:
    assert expected_text in err, err
  if status:  # the error is the last line, and the expected text is in it
    assert ": error: " in err.strip().splitlines()[-1] and expected_text in err.splitlines()[-1]
  if command == "train":
    for name, digest in readable.items():  # kept, byte for byte, whatever else happened
      assert conftest.tree_digest(workdir / "checkpoints" / name) == digest, name
  else:  # readers write nothing in checkpoints/
    assert conftest.tree_digest(workdir / "checkpoints") == before
  assert not (workdir / workdir_lock.LOCK_NAME).exists() or damage == "second_writer"


def test_step_naming_an_unreadable_or_absent_checkpoint_is_one_line(finished, tmp_path, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  truncate_largest(workdir / "checkpoints" / str(NEWEST))
  for command, args in (("evaluate", ["--max_examples=8"]), ("sample", ["--n=4"])):
    for step, message in (
      (
        NEWEST,
        f"checkpoint step {NEWEST} in {workdir / 'checkpoints'} is "
        "unreadable (a file is truncated or corrupt",
      ),
      (7, "no checkpoint for step 7"),
    ):
      status = cli.main(["flaxvae", command, f"--workdir={workdir}", f"--step={step}", *args])
      err = capsys.readouterr().err.strip()
      assert status == 2 and message in err and "\n" not in err, err
  assert flaxvae.load(str(workdir), step=OLDER).step == OLDER


# -- metrics.jsonl and TensorBoard after a kill ----------------------------------------------
def tensorboard_events(workdir):
  """Every Event in the run's tensorboard/ files (TFRecord: length, crc, data, crc)."""
  events = []
  for path in sorted((workdir / "tensorboard").iterdir()):
    data = path.read_bytes()
    while data:
      (length,) = struct.unpack("<Q", data[:8])
      event = event_pb2.Event()
      event.ParseFromString(data[12 : 12 + length])
      events.append(event)
      data = data[16 + length :]
  return events


def test_a_resume_supersedes_rows_past_its_checkpoint_and_never_appends_to_a_torn_line(
  finished, tiny_data_dir, tmp_path, caplog
):
  """A kill after the step-12 rows were logged but before checkpoint 12 committed (its folder
  is missing) and in the middle of a row: the resumed run logs 7..12 again."""
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  shutil.rmtree(workdir / "checkpoints" / str(NEWEST))
  (workdir / "eval.json").unlink()
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write('{"step": 6500, "loss": 12')
  before = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()[:-1]]
  with caplog.at_level(logging.WARNING, logger="flaxvae"):
    train(run_config(tiny_data_dir), str(workdir))
  assert f"line {len(before) + 1} is not a complete JSON row" in caplog.text
  assert "3 row(s) logged after step 6 by an earlier run marked superseded" in caplog.text
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  rows = [json.loads(line) for line in lines]  # every line parses: nothing was appended onto
  assert [r for r in rows if not r.get("superseded")][:3] == before[:3]  # rows up to step 6 kept
  assert sum(r.get("superseded", False) for r in rows) == 3  # train 9 and 12, final eval 12
  current = outputs.read_metrics(str(workdir))
  train_steps = [r["step"] for r in current if r["split"] == "train"]
  assert train_steps == [3, 6, 9, 12]  # each step once: one trajectory
  assert len(outputs.read_metrics(str(workdir), superseded=True)) == len(rows)
  starts = [e.step for e in tensorboard_events(workdir) if e.HasField("session_log")]
  assert starts == [OLDER + 1]  # TensorBoard hides the killed run's events from step 7 on


def test_read_metrics_skips_a_torn_line_with_a_warning(tmp_path, caplog):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train"}\n{"step": 2, "sp')
  with caplog.at_level(logging.WARNING, logger="flaxvae"):
    assert outputs.read_metrics(str(tmp_path)) == [{"step": 1, "split": "train"}]
  assert "line 2 is not a complete JSON row" in caplog.text


def test_a_resume_drops_only_a_torn_last_line_and_keeps_earlier_garbled_ones(tmp_path, caplog):
  """Only the last line can be a write in progress; a garbled line before it (an old run's row
  glued to a torn one) is kept for the user to read, and readers skip it."""
  rows = '{"step": 1, "split": "train"}\n{"step": 2, "sp{"step": 3, "split": "train"}\n'
  (tmp_path / "metrics.jsonl").write_text(rows + '{"step": 4, "spl')
  with caplog.at_level(logging.WARNING, logger="flaxvae"):
    outputs.settle_metrics(str(tmp_path / "metrics.jsonl"), resumed_from=4)
  assert (tmp_path / "metrics.jsonl").read_text() == rows
  assert "line 3 is not a complete JSON row" in caplog.text


# -- the lock -------------------------------------------------------------------------------
def write_lock(workdir, **holder):
  record = {
    "host": socket.gethostname(),
    "boot_id": workdir_lock._boot_id(),
    "pid": 1,
    "pid_start": None,
    "started_at": "2026-01-01T00:00:00Z",
    "heartbeat": time.time(),
    "command": "flaxvae train",
    **holder,
  }
  (workdir / workdir_lock.LOCK_NAME).write_text(json.dumps(record))


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
  workdir = tmp_path / "run"
  holder = hold_lock(workdir)
  try:
    with pytest.raises(workdir_lock.WorkdirInUse) as refused:
      workdir_lock.WorkdirLock(workdir).acquire()
  finally:
    holder.kill()
    holder.wait()
  message = str(refused.value)
  assert message.startswith(
    f"workdir {workdir} is in use by another flaxvae train: process {holder.pid} on host"
  )
  assert f"host {socket.gethostname()}, running since " in message and "\n" not in message
  assert "Wait for it to finish, stop it, or use another --workdir" in message
  assert f"delete {workdir / workdir_lock.LOCK_NAME}" in message
  assert refused.value.exit_status == 2


def test_a_lock_left_by_a_killed_trainer_is_taken_over_with_a_warning(tmp_path, caplog):
  workdir = tmp_path / "run"
  holder = hold_lock(workdir)
  holder.send_signal(signal.SIGKILL)  # no release: the file stays, the kernel drops the flock
  holder.wait()
  assert json.loads((workdir / workdir_lock.LOCK_NAME).read_text())["pid"] == holder.pid
  with caplog.at_level(logging.WARNING, logger="flaxvae"):
    lock = workdir_lock.WorkdirLock(workdir).acquire()
  lock.release()
  assert f"left by process {holder.pid} on host" in caplog.text
  assert f"process {holder.pid} no longer runs" in caplog.text
  assert not (workdir / workdir_lock.LOCK_NAME).exists()  # released: deleted


@pytest.mark.parametrize(
  "holder, reason",
  [
    ({"host": "elsewhere", "heartbeat": 1e9}, "last heartbeat from host elsewhere is "),
    ({"pid": os.getppid(), "pid_start": 1}, f"process id {os.getppid()} now belongs to another"),
    ({"boot_id": "another-boot", "heartbeat": 0.0}, "restarted after its last heartbeat"),
    ({"pid": None, "host": None, "oops": 1}, "names no holder"),
  ],
)
def test_stale_locks_are_taken_over_saying_why(tmp_path, caplog, holder, reason):
  write_lock(tmp_path, **holder)
  with caplog.at_level(logging.WARNING, logger="flaxvae"):
    workdir_lock.WorkdirLock(tmp_path).acquire().release()
  assert "taking over the lock of" in caplog.text and reason in caplog.text, caplog.text


def test_another_hosts_recent_heartbeat_is_a_live_holder(tmp_path):
  write_lock(tmp_path, host="elsewhere", pid=4242, heartbeat=time.time() - 30)
  before = conftest.tree_digest(tmp_path)
  with pytest.raises(
    workdir_lock.WorkdirInUse,
    match="process 4242 on host elsewhere, running "
    r"since 2026-01-01T00:00:00Z \(last heartbeat 30 s ago\)",
  ):
    workdir_lock.WorkdirLock(tmp_path).acquire()
  assert conftest.tree_digest(tmp_path) == before  # the holder's file is left alone


def test_the_heartbeat_is_refreshed_while_held(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lock, "HEARTBEAT_S", 0.05)
  lock = workdir_lock.WorkdirLock(tmp_path).acquire()
  first = json.loads((tmp_path / workdir_lock.LOCK_NAME).read_text())["heartbeat"]
  time.sleep(0.3)
  beat = json.loads((tmp_path / workdir_lock.LOCK_NAME).read_text())["heartbeat"]
  lock.release()
  assert beat > first


def test_a_refused_run_leaves_no_trace(tmp_path, tiny_data_dir):
  workdir = tmp_path / "new" / "run"
  with pytest.raises(FlaxvaeError, match="batch_size"):
    train(conftest.set_keys(run_config(tiny_data_dir), batch_size=-4), str(workdir))
  assert not (tmp_path / "new").exists()


def test_a_multi_process_job_refuses_on_every_process_together(tmp_path, monkeypatch):
  """Process 0 decides; the others only receive its outcome and never open the file."""
  sent = {}

  def broadcast(buffer):  # process 0's buffer, as jax's broadcast_one_to_all hands it out
    sent.setdefault("buffer", buffer)
    return sent["buffer"]

  from jax.experimental import multihost_utils

  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", broadcast)
  monkeypatch.setattr(workdir_lock.jax, "process_count", lambda: 2)
  write_lock(tmp_path, host="elsewhere", pid=4242)
  monkeypatch.setattr(workdir_lock.jax, "process_index", lambda: 0)
  with pytest.raises(workdir_lock.WorkdirInUse) as on_zero:
    with workdir_lock.held(tmp_path):
      pass
  monkeypatch.setattr(workdir_lock.jax, "process_index", lambda: 1)
  monkeypatch.setattr(workdir_lock.WorkdirLock, "acquire", lambda self: pytest.fail("opened"))
  with pytest.raises(workdir_lock.WorkdirInUse) as on_one:
    with workdir_lock.held(tmp_path):
      pass
  assert str(on_one.value) == str(on_zero.value)
