"""The one error hierarchy. Every error flaxvae raises on purpose is a `FlaxvaeError` whose str()
is one line saying what happened and what to do; the CLI prints it (no traceback) and exits with
its `exit_status`.

  FlaxvaeError
    UsageError       exit 2: the user can fix it before rerunning (nothing was written)
      ConfigError      a bad config value or combination, a bad flag
        WeightsMissing   pretrained weights (LPIPS, FID) not prepared (flaxvae/weights.py)
      DataError        missing, damaged or mismatched data
      CheckpointError  checkpoints that cannot be read or written, or do not fit this run
        WorkdirInUse     another live `flaxvae train` holds the workdir's lock
      OutputError      metrics or other outputs that cannot be written
    ModelContractError  exit 1: a model class that does not fulfil the model contract
    RunError         exit 1: the run itself failed; the last committed checkpoint is intact
      Diverged         too many non-finite or over-threshold steps in a row
      DeviceTimeout    device work that never finished (a stuck collective)

`one_line` is the one formatter that turns someone else's error (a library's, the OS's) into
text that fits in such a line.
"""

ONE_LINE_LIMIT = 400  # characters of a foreign error kept in a one-line message


def one_line(error_or_text, limit=ONE_LINE_LIMIT):
  """An error (or text) on one line: whitespace collapsed, at most `limit` characters then
  " ..."; an error whose message is empty is named by its type."""
  text = " ".join(str(error_or_text).split())
  if not text and isinstance(error_or_text, BaseException):
    text = type(error_or_text).__name__
  return text if len(text) <= limit else text[:limit] + " ..."


class FlaxvaeError(Exception):
  """Base of every error raised on purpose; str() is one line."""

  exit_status = 1


class UsageError(FlaxvaeError, ValueError):
  """Something the user can change (a flag, a config value, a file) before rerunning."""

  exit_status = 2


class ConfigError(UsageError):
  """A configuration problem (a bad key value, a batch that cannot be split, ...)."""


class WeightsMissing(ConfigError):
  """Pretrained weights a loss or metric needs are absent or unreadable; the one-line message
  says how to prepare them (`flaxvae weights prepare NAME`) and where they are looked for."""


class DataError(UsageError):
  """A dataset problem the user can fix; str() is one line saying what to do."""


class CheckpointError(UsageError):
  """Checkpoints cannot be written or read; the one-line message says what to do."""


class WorkdirInUse(CheckpointError):
  """Another live `flaxvae train` holds the workdir (train/workdir_lock.py); the message names
  the holder and what to do."""


class OutputError(UsageError):
  """A metrics row or other output could not be written (full disk, permissions)."""


class ModelContractError(FlaxvaeError, TypeError):
  """A model class lacks a method of the model contract (models/contract.py): raised when it
  registers, so it fails on import instead of in the middle of an evaluation."""


class RunError(FlaxvaeError):
  """The run failed while training or evaluating; its last committed checkpoint is intact."""

  exit_status = 1


class Diverged(RunError, FloatingPointError):
  """Training stopped: too many skipped (non-finite or over-threshold) steps in a row."""


class DeviceTimeout(RunError):
  """Device work did not finish in time: the runtime is wedged, so the process must exit."""
