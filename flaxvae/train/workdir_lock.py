"""One writer per workdir: `flaxvae train` holds WORKDIR/.flaxvae-lock while it runs.

Two trainers on one workdir (a SLURM requeue while the first job still runs, a relaunched
script, a second terminal) would both resume from the same step and interleave their
checkpoints and metrics rows. So `train()` takes this lock before it reads or writes
anything in the workdir, and a second writer is refused in one line (WorkdirInUse, exit
status 2):

  workdir runs/mlp is in use by another flaxvae train: process 4242 on host node7, running
  since 2026-01-02T03:04:05Z (last heartbeat 12 s ago). Wait for it to finish, stop it, or use
  another --workdir; if that process is dead on another machine, delete runs/mlp/.flaxvae-lock

Readers (`flaxvae evaluate`, `sample`, `report`, `flaxvae.load`) take no lock: they read the
newest complete checkpoint, which a running trainer never changes (checkpoint.py).

How it works. The lock file holds JSON naming its holder: host, boot id, pid, the process's
start time (from /proc/<pid>/stat, so a reused pid is told apart), started_at, heartbeat and
command line. The holder keeps it `fcntl.flock`ed on an open descriptor for the whole run
(the kernel drops that lock the moment the process dies, however it dies) and a daemon
thread rewrites the heartbeat every HEARTBEAT_S seconds. A contender first tries the flock:

  - refused by the kernel: a live holder (on this machine, or on a shared filesystem that
    carries flocks between machines): refused.
  - granted, and the file names this machine (host name and boot id): no process here holds
    it, so it is stale; the pid says why (it no longer runs, or the pid now belongs to a
    process started at another time). It is taken over with one warning naming its holder
    and why it is stale.
  - granted, and the file names another machine: flocks may not reach between machines on
    this filesystem, so the heartbeat decides: live (refused) while it is younger than
    STALE_AFTER_S, stale (taken over, with a warning) after, or at once when it names this
    host name from before this machine's last boot.
  - a filesystem without flock (ENOLCK): the record alone decides, a live pid with its start
    time being a live holder on this machine.

A released lock file is deleted (flock held) by its holder, so a finished workdir carries
none, and a run refused by a config check leaves the workdir as it was (a workdir this call
created is removed again). Deleting is safe because every contender, after its flock is
granted, checks that the path still names the file it locked, and starts over if not.

Multi-process runs take it once: process 0 locks, and its outcome (held, or the one-line
refusal) goes to every process, so all of them refuse together. Processes other than 0 never
touch the file.
"""

import contextlib
import datetime
import errno
import fcntl
import functools
import json
import logging
import os
import socket
import sys
import threading
import time

import jax
import numpy as np

from flaxvae.errors import CheckpointError, WorkdirInUse, one_line

log = logging.getLogger("flaxvae")

LOCK_NAME = ".flaxvae-lock"
HEARTBEAT_S = 30.0  # how often a holder rewrites its heartbeat
STALE_AFTER_S = 600.0  # another host's lock with an older heartbeat is stale (20 missed beats)
_MESSAGE_BYTES = 2048  # room for the refusal's text when it is sent to the other processes


def _now():
  return time.time()


def _iso(seconds):
  return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def process_start_time(pid):
  """The start time of process `pid` in clock ticks since boot (/proc/<pid>/stat field 22), or
  None where there is no such process (or no /proc): with the pid, it names one process."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      stat = f.read()
  except OSError:
    return None
  return int(stat.rsplit(")", 1)[1].split()[19])  # fields after the (command) start at 3


def _pid_alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process: alive
    return True
  return True


def _ago(seconds):
  seconds = max(0, int(seconds))
  if seconds < 120:
    return f"{seconds} s"
  return f"{seconds // 60} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _boot_id():
  """This boot of this machine (Linux), so two machines that share a host name are told apart."""
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f.read().strip()
  except OSError:
    return None


def _boot_time():
  try:
    with open("/proc/uptime") as f:
      return _now() - float(f.read().split()[0])
  except OSError:
    return None


def _stale_reason(holder, now, flock_granted=True):
  """Why the lock `holder` describes is stale, or None if its holder may be alive.

  On this machine (same host name and boot) a granted flock settles it: no process here holds
  the lock, and the pid only says why. Elsewhere the heartbeat decides.
  """
  if (
    not isinstance(holder, dict)
    or not isinstance(holder.get("pid"), int)
    or not isinstance(holder.get("host"), str)
  ):
    return "it names no holder (a lock file left half-written)"
  pid, host, heartbeat = holder["pid"], holder["host"], _heartbeat(holder, 0.0)
  same_host = host == socket.gethostname()
  if same_host and holder.get("boot_id") in (None, _boot_id()):
    if not _pid_alive(pid):
      return f"process {pid} no longer runs"
    started = process_start_time(pid)  # None without /proc: the pid alone then decides
    if started is not None and holder.get("pid_start") not in (None, started):
      return f"process id {pid} now belongs to another process, started later"
    if not flock_granted:  # a filesystem without flock: a live pid is a live holder
      return None
    return f"process {pid} runs but holds no lock on the file (it was replaced under it)"
  boot = _boot_time()
  if same_host and boot is not None and heartbeat < boot:
    return "this machine restarted after its last heartbeat"
  if now - heartbeat > STALE_AFTER_S:
    return (
      f"its last heartbeat from host {host} is {_ago(now - heartbeat)} old (stale after "
      f"{_ago(STALE_AFTER_S)} without one)"
    )
  return None


def _heartbeat(holder, default):
  try:
    return float(holder.get("heartbeat", default))
  except (TypeError, ValueError):
    return default


def _describe(holder, now):
  return (
    f"process {holder.get('pid')} on host {holder.get('host')}, running since "
    f"{holder.get('started_at', '?')} (last heartbeat {_ago(now - _heartbeat(holder, now))} "
    "ago)"
  )


class WorkdirLock:
  """The lock of one workdir; `acquire()` once, `release()` once (or use `held`)."""

  def __init__(self, workdir):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_NAME)
    self._fd = None
    self._created = []  # directories this lock created, removed again if left empty
    self._stop = threading.Event()
    self._thread = None
    self._record = None

  # -- taking it ----------------------------------------------------------------------
  def acquire(self):
    """Holds the lock, taking over a stale one with a warning; WorkdirInUse if it is live."""
    self._make_workdir()
    try:
      while self._fd is None:
        self._fd = self._try_lock()
      self._record = {
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "pid": os.getpid(),
        "pid_start": process_start_time(os.getpid()),
        "started_at": _iso(_now()),
        "heartbeat": _now(),
        "command": " ".join(sys.argv)[:500],
      }
      self._write(self._record)
    except OSError as e:
      self.release()
      self.remove_created_if_empty()
      raise CheckpointError(
        f"could not lock {self.workdir} for writing ({self.path}: "
        f"{e.strerror or one_line(e)}). Fix its permissions or free space, "
        "or choose another --workdir"
      ) from None
    except BaseException:
      self.remove_created_if_empty()
      raise
    self._thread = threading.Thread(target=self._beat, name="flaxvae-workdir-lock", daemon=True)
    self._thread.start()
    return self

  def _try_lock(self):
    """An open descriptor of the lock file, flocked where the filesystem can; None when the
    file was deleted (released) between opening and locking it: try again."""
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      flock_granted = True
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
          raise WorkdirInUse(self._refusal(self._read_holder(fd))) from None
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
          raise
        flock_granted = False  # no flocks here: the record alone tells live from stale
      if not self._still_the_file(fd):
        os.close(fd)
        return None
      self._check_previous(fd, flock_granted)
    except BaseException:
      with contextlib.suppress(OSError):
        os.close(fd)
      raise
    return fd

  def _make_workdir(self):
    missing, path = [], self.workdir
    while not os.path.isdir(path):
      missing.append(path)
      path = os.path.dirname(path)
    try:
      os.makedirs(self.workdir, exist_ok=True)
    except OSError as e:
      raise CheckpointError(
        f"could not create the workdir {self.workdir}: "
        f"{e.strerror or one_line(e)}. Fix permissions or choose another "
        "--workdir"
      ) from None
    self._created = missing  # deepest first

  def _still_the_file(self, fd):
    try:
      return os.path.samestat(os.fstat(fd), os.stat(self.path))
    except FileNotFoundError:
      return False

  def _check_previous(self, fd, flock_granted):
    """The flock is ours: refuse if the record names a holder that may be alive (another
    host's recent heartbeat), else warn of a stale lock taken over (an empty file is new)."""
    now = _now()
    holder = self._read_holder(fd)
    if holder is None:
      return
    reason = _stale_reason(holder, now, flock_granted)
    if reason is None:
      raise WorkdirInUse(self._refusal(holder))
    log.warning(
      "taking over the lock of %s, stale: it was left by %s, and %s",
      self.workdir,
      _describe(holder, now) if isinstance(holder, dict) and holder else "an unknown holder",
      reason,
    )

  def _read_holder(self, fd):
    """The holder's record; None for an empty file, {} for one unreadable after a few tries
    (a holder on another host may be rewriting its heartbeat at this moment)."""
    for attempt in range(3):
      try:
        text = os.pread(fd, 1 << 16, 0).decode(errors="replace")
      except OSError:
        return {}
      if not text.strip():
        return None
      try:
        return json.loads(text)
      except ValueError:
        time.sleep(0.05 * (attempt + 1))
    return {}

  def _refusal(self, holder):
    holder = holder if isinstance(holder, dict) and holder else {}
    who = _describe(holder, _now()) if holder else "a process whose lock file is unreadable"
    return (
      f"workdir {self.workdir} is in use by another flaxvae train: {who}. Wait for it to "
      "finish, stop it, or use another --workdir; if that process is dead on another "
      f"machine, delete {self.path}"
    )

  # -- holding it ---------------------------------------------------------------------
  def _write(self, record):
    data = json.dumps(record).encode()
    os.pwrite(self._fd, data, 0)
    os.ftruncate(self._fd, len(data))

  def _beat(self):
    while not self._stop.wait(HEARTBEAT_S):
      try:
        self._write(dict(self._record, heartbeat=_now()))
      except OSError as e:  # a full or vanished disk: the run's own writes will say so
        log.warning("could not refresh the heartbeat in %s: %s", self.path, one_line(e))

  # -- letting it go ------------------------------------------------------------------
  def release(self):
    """Deletes the lock file (still holding the flock), then unlocks; safe to call twice."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    if self._fd is None:
      return
    with contextlib.suppress(OSError):
      if self._still_the_file(self._fd):
        os.unlink(self.path)
    with contextlib.suppress(OSError):
      os.close(self._fd)  # closing drops the flock
    self._fd = None

  def remove_created_if_empty(self):
    """After a refused run: the workdir (and parents) this lock created go again if empty."""
    for path in self._created:
      with contextlib.suppress(OSError):
        os.rmdir(path)  # only ever succeeds on an empty directory
    self._created = []


def _share_outcome(error):
  """Process 0's outcome (None, or its one-line error) on every process; the others raise it."""
  text = b"" if error is None else str(error).encode()[: _MESSAGE_BYTES - 2]
  kind = 0 if error is None else (1 if isinstance(error, WorkdirInUse) else 2)
  buffer = np.zeros(_MESSAGE_BYTES, np.uint8)
  buffer[0], buffer[1 : 1 + len(text)] = kind, np.frombuffer(text, np.uint8)
  from jax.experimental import multihost_utils  # noqa: PLC0415  (multi-process runs only)

  buffer = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
  if buffer[0] and error is None:
    message = bytes(buffer[1:]).rstrip(b"\0").decode(errors="replace")
    raise (WorkdirInUse if buffer[0] == 1 else CheckpointError)(message)


@contextlib.contextmanager
def held(workdir):
  """Holds the workdir's lock for the block (process 0 of a multi-process job holds it for
  all); a run that fails before its first write leaves no trace of it."""
  lock = WorkdirLock(workdir)
  error = None
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except Exception as e:  # sent to the other processes, so that none of them waits
      error = e
  if jax.process_count() > 1:
    _share_outcome(error)
  if error is not None:
    raise error
  try:
    yield lock
  finally:
    lock.release()
    lock.remove_created_if_empty()


def single_writer(train):
  """Decorates `train(config, workdir, ...)`: the whole call holds the workdir's lock."""

  @functools.wraps(train)
  def locked(config, workdir, *args, **kwargs):
    with held(workdir):
      return train(config, workdir, *args, **kwargs)

  return locked
