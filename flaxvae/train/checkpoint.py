"""Orbax checkpoints of a run: the train state, the data position and the resolved config.

Layout: `workdir/checkpoints/<step>/` is a plain Orbax CheckpointManager step with items

  state   StandardSave pytree `step.TrainState` as a dict: step, params, opt_state,
          ema_params, rng (raw uint32 key data), skipped, consecutive_skips, guard
  data    JSON: whatever the input pipeline's `feed.state()` returned (the next batch)
  config  JSON: the resolved config of the run that wrote it

Saves are asynchronous: `save()` blocks only while device arrays are copied to host,
then a background thread writes `<step>.orbax-checkpoint-tmp-*` and renames it to
`<step>` when every item is complete, so a half-written step is never listed. Kept:
the last `checkpoint.max_to_keep` steps plus the `checkpoint.keep_best` steps with
the highest eval ELBO (steps saved together with an evaluation). A state with a NaN
or inf is never saved.

One fallback serves the trainer and every reader (`flaxvae evaluate`, `sample`,
`flaxvae.load`, init.params_from): `newest_readable` opens the newest step that reads, with
one warning line per newer step skipped naming it and why (a truncated file, a missing item
or metadata file, an empty folder). Readers open the manager read-only and change nothing
(a run may be writing the workdir meanwhile); only the trainer, which holds the workdir's
lock (workdir_lock.py), renames an unreadable step `<step>.unreadable-<time>`, since its next
save must be newer than every listed step. A reader's `--step N` that is absent or
unreadable, or a workdir without a readable step, is a one-line CheckpointError (exit 2).

Opening a checkpoint with orbax-checkpoint alone (no flaxvae, any device count):

    import orbax.checkpoint as ocp, json, pathlib
    step_dir = pathlib.Path("runs/mlp/checkpoints") / "24000"
    checkpointer = ocp.StandardCheckpointer()
    tree = checkpointer.metadata((step_dir / "state").absolute()).item_metadata.tree
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])   # the layout to restore onto
    state = checkpointer.restore((step_dir / "state").absolute(), jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), tree))
    params = state["params"]          # nested dict of arrays, e.g. params["encoder"]...
    config = json.loads((step_dir / "config" / "metadata").read_text())

or `ocp.CheckpointManager("runs/mlp/checkpoints").restore(step, args=ocp.args.Composite(
state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))`.

Preemption exit statuses (see `preemption.py`): 128 + signal number (143 for SIGTERM,
130 for SIGINT) after the checkpoint of the current step has committed; 137 when a
second signal forced an immediate exit (only the last committed checkpoint counts).
"""

import json
import logging
import os
import re
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from flaxvae import config as config_lib
from flaxvae.errors import CheckpointError, ConfigError, Diverged, FlaxvaeError, one_line

log = logging.getLogger("flaxvae")

# Keys whose change alters what the run computes: resuming across them needs
# checkpoint.allow_config_change=True. A key matches itself and everything under it.
MEANING_KEYS = (
  "seed",
  "num_steps",
  "batch_size",
  "dtype",
  "ema_decay",
  "model",
  "objective",
  "optimizer",
  "data.name",
  "data.protocol",
  "data.train_split",
)
# Keys that keep the run's meaning but, with scan_unroll > 1, change where dispatches
# start and so the last bits of the numbers (an unrolled scan fuses across steps).
DISPATCH_KEYS = (
  "scan_unroll",
  "steps_per_dispatch",
  "log_every_steps",
  "eval.every_steps",
  "checkpoint.every_steps",
)


def _flatten(tree, prefix=""):
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      flat.update(_flatten(value, name + "."))
    else:
      flat[name] = value
  return flat


def _matches(name, keys):
  return any(name == k or name.startswith(k + ".") for k in keys)


def config_changes(saved, current, keys=MEANING_KEYS):
  """Sorted 'key: saved -> current' strings for the `keys` that differ."""
  a, b = _flatten(saved), _flatten(current)
  names = sorted(n for n in set(a) | set(b) if _matches(n, keys) and a.get(n) != b.get(n))
  return [f"{n}: {a.get(n, '<absent>')!r} -> {b.get(n, '<absent>')!r}" for n in names]


def check_resumable(saved, current, step, directory):
  """Refuses to resume under a config that changes the run's meaning (unless allowed).

  The saved config is read on top of today's defaults (config.with_defaults), so keys added
  since it was written compare as their defaults, not as changes.
  """
  saved = json.loads(config_lib.with_defaults(saved).to_json_best_effort())
  changes = config_changes(saved, current)
  allowed = current["checkpoint"]["allow_config_change"]  # both configs hold every default
  if changes and not allowed:
    raise ConfigError(
      f"the config differs from the one checkpoint step {step} in {directory} was written "
      f"with, in {'; '.join(changes)}. Use a new --workdir, or pass "
      "--config.checkpoint.allow_config_change=True if the change is intended"
    )
  if changes:
    log.warning("resuming with a changed config (allowed): %s", "; ".join(changes))
  if current["scan_unroll"] > 1 or saved["scan_unroll"] > 1:
    drift = config_changes(saved, current, DISPATCH_KEYS)
    if drift:
      log.warning(
        "with scan_unroll > 1, changing %s moves dispatch boundaries: the resumed run "
        "will not be bitwise identical to an uninterrupted one",
        "; ".join(drift),
      )


def _all_finite(state):
  """True when the trained values (params, optimizer state, EMA, and the discriminator's
  params and optimizer state) hold no NaN or inf.

  The guard's window of recent norms is NaN-padded by design and is not checked.
  """
  fields = state._asdict() if hasattr(state, "_asdict") else state
  trained = [fields[k] for k in ("params", "opt_state", "ema_params") if k in fields]
  adversary = fields.get("adversary")
  if adversary:  # the discriminator's (train/players.py AdversaryState, or its saved dict)
    parts = adversary._asdict() if hasattr(adversary, "_asdict") else adversary
    trained += [parts["params"], parts["opt_state"]]
  return bool(_finite(trained))


@jax.jit
def _finite(tree):
  leaves = [
    jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _storage_error(action, directory, error):
  return CheckpointError(
    f"could not {action} in {directory}: {error}. Free space or fix "
    "permissions (or choose another --workdir); earlier checkpoints are intact"
  )


class Checkpointer:
  """Asynchronous saves, keeping the last `max_to_keep` plus the `keep_best` best-ELBO steps."""

  def __init__(self, workdir, checkpoint_config):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    keep = [policies.LatestN(n=checkpoint_config.max_to_keep)]
    if checkpoint_config.keep_best:
      keep.append(
        policies.BestN(
          get_metric_fn=lambda m: m["elbo"],
          reverse=False,
          n=checkpoint_config.keep_best,
          keep_checkpoints_without_metrics=False,
        )
      )
    self._options = ocp.CheckpointManagerOptions(
      preservation_policy=policies.AnyPreservationPolicy(keep),
      enable_async_checkpointing=True,
      create=True,
    )
    self._manager = None
    self.last_blocked_s = 0.0  # how long the last save() held up the caller
    self._closed = False
    self._damaged = []  # steps restore_latest skipped, set aside once the run may write

  @property
  def manager(self):
    """The Orbax manager, opened on first use; an absent directory is created only by
    `start_writing`, so checks that fail leave no trace in the workdir."""
    if self._manager is None:
      if not os.path.isdir(self.directory):
        return None
      self._manager = _open_manager(self.directory, self._options)
    return self._manager

  def start_writing(self):
    """Creates the checkpoint directory and sets damaged steps aside (once every start-up check
    has passed, so a refused run leaves the workdir as it was)."""
    if self._manager is None:
      self._manager = _open_manager(self.directory, self._options)
    self._set_aside(self._damaged)
    self._damaged = []

  def check_writable(self):
    """Fails at start, not at the first save, when the workdir cannot take checkpoints."""
    if jax.process_index():
      return
    probe = os.path.join(self.directory, f".write-probe-{os.getpid()}")
    try:
      os.makedirs(self.directory, exist_ok=True)
      with open(probe, "w") as f:
        f.write("ok")
    except OSError as e:
      raise _storage_error("write checkpoints", self.directory, e.strerror or e) from None
    finally:
      if os.path.exists(probe):
        os.remove(probe)

  def latest_step(self):
    return self.manager.latest_step() if self.manager else None

  def all_steps(self):
    return list(self.manager.all_steps()) if self.manager else []

  def save(self, step, state, data_state, config_json, metrics=None):
    """Starts an asynchronous save of `state` (global jax arrays); returns once it is copied.

    `metrics` (an eval row with "elbo") makes the step a candidate for keep-best.
    """
    if not _all_finite(state):
      raise Diverged(
        f"the train state at step {step} holds a NaN or inf, so it was not saved; last good "
        f"checkpoint: step {self.latest_step()} in {self.directory}"
      )
    start = time.perf_counter()
    try:
      self.manager.save(
        int(step),
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(
            dict(state._asdict()) if hasattr(state, "_asdict") else state
          ),
          data=ocp.args.JsonSave(data_state),
          config=ocp.args.JsonSave(config_json),
        ),
        metrics=None if metrics is None else {"elbo": float(metrics["elbo"])},
        force=True,
      )
    except OSError as e:
      raise _storage_error(f"save step {step}", self.directory, e) from None
    self.last_blocked_s = time.perf_counter() - start

  def wait(self):
    """Blocks until the pending save has committed; a failed write raises CheckpointError."""
    if self._manager is None:
      return
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # orbax re-raises the writer thread's error, whatever its type
      raise _storage_error("finish writing a checkpoint", self.directory, one_line(e)) from None

  def close(self):
    """Waits for the pending save, then releases the manager (safe to call twice)."""
    if self._closed:
      return
    self._closed = True
    error = None
    try:
      self.wait()
    except CheckpointError as e:
      error = e
    try:
      if self._manager is not None:
        self._manager.close()
    except Exception as e:  # orbax raises a failed write again here: report it once, in one line
      error = error or _storage_error("finish writing a checkpoint", self.directory, one_line(e))
    if error is not None:
      raise error

  # -- restoring --------------------------------------------------------------
  def read_config(self, step):
    return self.manager.restore(int(step), args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
      "config"
    ]

  def restore(self, step, abstract_state):
    """(state, data_state, config_json) of `step`, laid out (and typed) as `abstract_state`."""
    as_dict = hasattr(abstract_state, "_asdict")
    restored = self.manager.restore(
      int(step),
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(
          dict(abstract_state._asdict()) if as_dict else abstract_state
        ),
        data=ocp.args.JsonRestore(),
        config=ocp.args.JsonRestore(),
      ),
    )
    state = type(abstract_state)(**restored["state"]) if as_dict else restored["state"]
    return state, restored["data"], restored["config"]

  def restore_latest(self, abstract_state, current_config=None):
    """(step, state, data_state, config_json) of the newest readable step, or None if none.

    `current_config` (resolved JSON) is checked against each step's saved config first, so a
    refused change raises ConfigError before any array is read. Damaged steps are skipped by
    `newest_readable` (the readers' fallback too) and set aside by `start_writing` (renamed,
    never deleted), so the next save, which must be newer than the latest step, can proceed.
    A step that fails to read without damage to its files (another model's shapes, another
    flaxvae's tree, memory, I/O) is a CheckpointError: it is never set aside.
    """

    def read(step):
      saved = self.read_config(step)
      if current_config is not None:
        check_resumable(saved, current_config, step, self.directory)
      state, data_state, config_json = self.restore(step, abstract_state)
      if not _all_finite(state):
        raise ValueError("it holds a NaN or inf")
      return state, data_state, config_json

    step, restored, skipped = newest_readable(
      self.directory,
      self.all_steps(),
      read,
      none_left="no earlier checkpoint: starting from scratch",
      required=False,
      skip_only_damage=True,
    )
    self._damaged = skipped
    return None if step is None else (step, *restored)

  def _set_aside(self, steps):
    """Renames damaged steps so new saves (which must be newer than the latest) can proceed.

    Every process calls it once (start_writing), whatever it found, so the barrier of a
    multi-process run is met by all of them even where one process skipped a step the others
    read."""
    if not steps and jax.process_count() == 1:
      return
    if jax.process_index() == 0:
      stamp = time.strftime("%Y%m%d-%H%M%S")
      for step in steps:
        src = os.path.join(self.directory, str(step))
        if os.path.isdir(src):
          os.rename(src, f"{src}.unreadable-{stamp}")
    if jax.process_count() > 1:  # every process lists the steps after process 0 renamed them
      multihost_utils.sync_global_devices("flaxvae: damaged checkpoints set aside")
    self.manager.reload()


# -- the one fallback: the trainer and every reader open checkpoints through it ----------
ITEMS = ("state", "data", "config")


class _OrbaxNotices(logging.Filter):
  """Orbax's lines that say nothing is wrong, or that flaxvae says better: "Metadata file does
  not exist" for a step folder without it, printed when a manager lists its steps (the warning
  of `newest_readable` names the step and why it is skipped, and a step that only lacks that
  file still reads), and "Given directory is read only", printed whenever a reader opens a
  finished run."""

  QUIET = ("Metadata file does not exist", "Given directory is read only")

  def filter(self, record):
    return not str(record.msg).startswith(self.QUIET)


_ORBAX_NOTICES = _OrbaxNotices()


def _open_manager(directory, options):
  logging.getLogger("absl").addFilter(_ORBAX_NOTICES)  # once: the same filter object
  return ocp.CheckpointManager(directory, options=options)


def newest_readable(
  directory,
  steps,
  read,
  step=None,
  none_left="no earlier checkpoint",
  required=True,
  skip_only_damage=False,
):
  """(step, read(step), skipped steps) for the newest of `steps` that `read` opens.

  Each step `read` fails on (a truncated file, a missing item or metadata file, an empty
  folder) is skipped with one warning line naming it, why, and the step tried next. With
  `step`, only that one is tried, and an absent or unreadable one is a CheckpointError. When
  none can be read: a CheckpointError if `required` (readers), else (None, None, skipped)
  (the trainer starts from scratch). With `skip_only_damage` (the trainer, which sets skipped
  steps aside) a step that fails without damage to its files is a CheckpointError instead of
  skipped. Nothing in `directory` is changed here: only the trainer sets damaged steps
  aside. Errors flaxvae raises on purpose (a refused config change, data that is missing) are
  not damage and pass through.
  """
  steps = sorted(steps, reverse=True)
  if step is not None:
    if step not in steps:
      raise CheckpointError(
        f"no checkpoint for step {step} in {directory}: available steps are {sorted(steps)}"
      )
    try:
      return step, read(step), []
    except FlaxvaeError:
      raise
    except Exception as e:  # whatever orbax, tensorstore or the OS raised: this step is damaged
      why, _ = why_unreadable(directory, step, e)
      raise CheckpointError(
        f"checkpoint step {step} in {directory} is unreadable ({why}): choose another --step "
        f"(steps there: {sorted(steps)}), or leave --step out to use the newest readable "
        "one"
      ) from None
  skipped = []
  for i, candidate in enumerate(steps):
    try:
      return candidate, read(candidate), skipped
    except FlaxvaeError:
      raise
    except Exception as e:  # whatever orbax, tensorstore or the OS raised
      why, damaged = why_unreadable(directory, candidate, e)
      if skip_only_damage and not damaged:
        raise CheckpointError(
          f"checkpoint step {candidate} in {directory} could not be read ({why}), and its files "
          "look intact, so it is left as it is: resume with the config and flaxvae version "
          "that wrote it, or use a new --workdir"
        ) from None
      fallback = steps[i + 1] if i + 1 < len(steps) else None
      log.warning(
        "checkpoint step %d in %s is unreadable (%s); %s",
        candidate,
        directory,
        why,
        f"falling back to step {fallback}" if fallback is not None else none_left,
      )
      skipped.append(candidate)
  if required:
    which = ", ".join(map(str, skipped))
    which = (
      ""
      if not skipped
      else f": step {which} is unreadable (the warning above says why)"
      if len(skipped) == 1
      else f": steps {which} are unreadable (the warnings above say why)"
    )
    raise CheckpointError(
      f"no readable checkpoint in {directory}{which}. Train it again "
      "(flaxvae train --config ... --workdir DIR), or restore checkpoints/ "
      "from a copy"
    )
  return None, None, skipped


# What tensorstore says of a file cut short or garbled, and of a NaN a step was saved with.
_DAMAGE_MARKS = ("OUT_OF_RANGE", "DATA_LOSS", "NaN or inf")


def why_unreadable(directory, step, error):
  """(what is wrong with checkpoint `step` in a few words, whether its files are damaged): a
  missing piece if one is missing, else the innermost error. Damage is a missing piece, a file
  cut short or garbled, or an item that is not JSON; anything else (another model's shapes,
  another flaxvae's tree, memory, I/O) leaves the files as they were written."""
  step_dir = os.path.join(directory, str(step))
  if not os.path.isdir(step_dir):
    return "its folder is gone (deleted while it was read?)", True
  if not os.listdir(step_dir):
    return "its folder is empty", True
  missing = [item for item in ITEMS if not os.path.isdir(os.path.join(step_dir, item))]
  if missing:
    return f"item(s) {', '.join(missing)} missing", True
  for item, name in (("state", "_METADATA"), ("config", "metadata"), ("data", "metadata")):
    if not os.path.exists(os.path.join(step_dir, item, name)):
      return f"its {item} item lacks its {name} file", True
  not_json = False
  while error.__cause__ is not None:  # orbax wraps tensorstore's error, which names the file
    not_json = not_json or isinstance(error, json.JSONDecodeError)
    error = error.__cause__
  not_json = not_json or isinstance(error, json.JSONDecodeError)
  text = re.sub(r' in OCDBT database at local file "[^"]*"', "", str(error))  # the step's path
  text = one_line(text or type(error).__name__, 200)
  if "OUT_OF_RANGE" in text or "DATA_LOSS" in text:
    text = f"a file is truncated or corrupt: {text}"
  return text, not_json or any(mark in text for mark in _DAMAGE_MARKS)


def read_only_manager(directory):
  """An Orbax manager over `directory` that never writes (readers; a run may be writing)."""
  return _open_manager(
    directory, ocp.CheckpointManagerOptions(create=False, read_only=True, save_interval_steps=0)
  )


def restore_items(manager, step, **items):
  """The named items of `step` (e.g. config=ocp.args.JsonRestore()), as a dict."""
  return dict(manager.restore(int(step), args=ocp.args.Composite(**items)))


def restore_state(manager, step, abstract_state):
  """The `state` item of `step` alone, laid out (and typed) as `abstract_state`.

  A field this version added that is empty in this run (`adversary=()` of a model without a
  discriminator) is absent from an older version's checkpoint: it is restored as empty, so
  flaxvae 0.1's checkpoints still load."""
  as_dict = hasattr(abstract_state, "_asdict")
  target = dict(abstract_state._asdict()) if as_dict else abstract_state

  def restore(tree):
    return restore_items(manager, step, state=ocp.args.StandardRestore(tree))["state"]

  if not as_dict:
    return restore(target)
  saved = _saved_fields(manager, step)  # read first: a failed restore leaves orbax's reads behind
  absent = {
    k: v
    for k, v in target.items()
    if isinstance(v, tuple) and not v and saved is not None and k not in saved
  }
  restored = {**restore({k: v for k, v in target.items() if k not in absent}), **absent}
  return type(abstract_state)(**restored)


def _saved_fields(manager, step):
  """The top-level fields of `step`'s saved state; None where its metadata is unreadable (the
  restore then reports the damage)."""
  state_dir = os.path.join(str(manager.directory), str(int(step)), "state")
  try:
    return set(ocp.StandardCheckpointer().metadata(state_dir).item_metadata.tree)
  except Exception:  # damaged metadata: the restore that follows reports it
    return None


def read_state(state_dir):
  """A checkpoint's `state` item as host arrays, whatever topology wrote it (orbax alone)."""
  checkpointer = ocp.StandardCheckpointer()
  tree = checkpointer.metadata(os.path.abspath(state_dir)).item_metadata.tree
  one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device), tree)
  return checkpointer.restore(os.path.abspath(state_dir), target)


def trained_params(workdir):
  """The parameters evaluation uses (the EMA when kept) of a run's newest readable checkpoint."""
  directory = os.path.join(workdir, "checkpoints")
  steps = [int(p) for p in os.listdir(directory) if p.isdigit()] if os.path.isdir(directory) else []
  if not steps:
    raise CheckpointError(
      f"init.params_from={workdir}: no checkpoint in {directory}; train that run first"
    )
  _, state, _ = newest_readable(
    directory, steps, lambda step: read_state(os.path.join(directory, str(step), "state"))
  )
  return state["ema_params"] if state.get("ema_params") else state["params"]


def abstract_like(tree, sharding):
  """ShapeDtypeStructs of `tree` placed with `sharding` (one, or a tree of them): the target of
  a restore, which lays the saved arrays out so whatever mesh wrote them."""
  if isinstance(sharding, jax.sharding.Sharding):
    sharding = jax.tree.map(lambda _: sharding, tree)
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sharding
  )
