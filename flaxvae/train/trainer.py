"""The trainer: one function, `train(config, workdir)`, in banner-commented stages.

    flaxvae train --config configs/fashion_mnist_mlp.py --workdir runs/mlp

The hot loop sends only example indices to the devices: the training split lives on device,
each dispatch runs `config.steps_per_dispatch` steps in one jitted lax.scan, at most two
dispatches are queued (runtime/dispatch.py), and metrics stay on device until a log step
fetches them.
"""

import json
import logging
import os
import signal
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from flaxvae import config as config_lib
from flaxvae import console
from flaxvae import settings as settings_lib
from flaxvae.errors import ConfigError, DeviceTimeout, Diverged
from flaxvae.eval import evaluation, sampling
from flaxvae.eval.evaluator import Evaluator
from flaxvae.run import Run
from flaxvae.runtime import dispatch, jax_private
from flaxvae.train import checkpoint as checkpoint_lib
from flaxvae.train import outputs, preemption, workdir_lock
from flaxvae.train import step as step_lib

log = logging.getLogger("flaxvae")


def event_boundaries(settings):
  """Steps at which the host must act: log, evaluate, checkpoint or stop."""
  return [
    s
    for s in (settings.log_every_steps, settings.eval.every_steps, settings.checkpoint.every_steps)
    if s > 0
  ]


def scheduled_evaluations(eval_settings, num_steps):
  """Steps evaluated besides the multiples of eval.every_steps: with eval.schedule "log", step
  0 and about eval.log_points log-spaced steps up to num_steps, so the report shows how the
  distances to the prior and to the posterior move early in training."""
  if eval_settings.schedule != "log":
    return frozenset()
  points = np.geomspace(1, num_steps, eval_settings.log_points)
  return frozenset({0} | {int(round(p)) for p in points if round(p) < num_steps})


def next_dispatch_size(step, settings, evaluations=frozenset()):
  """Steps to run in the next dispatch: steps_per_dispatch, or the largest power of two that
  does not pass an event (log, evaluation, checkpoint, a scheduled evaluation) or the end.

  So a remainder runs in a few dispatches (400 steps with 500 per dispatch: 256 + 128 + 16),
  and the train function compiles for at most 1 + log2(steps_per_dispatch) sizes.
  """
  limit = min(settings.steps_per_dispatch, settings.num_steps - step)
  for every in event_boundaries(settings):
    limit = min(limit, every - step % every)
  for event in evaluations:
    if event > step:
      limit = min(limit, event - step)
  return limit if limit == settings.steps_per_dispatch else 1 << (limit.bit_length() - 1)


def check_no_recompilation(train_fn, sizes_run):
  """Cheap guard: one compilation per program and dispatch size (`sizes_run`: the pairs run),
  none after (jit functions: the pmap strategy's function keeps no count)."""
  counts = [jax_private.compilations(fn) for fn in step_lib.programs(train_fn)]
  compiled = None if None in counts else sum(counts)
  if compiled is not None and compiled > len(sizes_run):
    raise RuntimeError(
      f"the train step compiled {compiled} times for dispatch sizes "
      f"{sorted({n for _, n in sizes_run})}: an argument changed shape, dtype or sharding"
    )


def every(step, interval):
  """True at multiples of `interval`; never when it is 0 (only at the end and on preemption)."""
  return interval > 0 and step % interval == 0


@workdir_lock.single_writer  # one writer per workdir: a second is refused
def train(config, workdir, dataset=None):
  """Trains (or resumes) the run in `workdir`; returns the final evaluation row.

  `dataset` (data.ArrayDataset, ...) replaces the one `config.data` names. The ConfigDict is
  resolved here, once (settings.resolve); below, each part gets its own section of the
  settings, and the config itself is only written out (config.json, the checkpoints' JSON).
  """
  started = time.perf_counter()
  # --------------------------------------------------------------------------
  # Setup: every check that can refuse the run happens here, before anything
  # in the workdir is written (a refused resume leaves it exactly as it was).
  # --------------------------------------------------------------------------
  if isinstance(config, settings_lib.Settings):  # it must write the ConfigDict out, below
    raise ConfigError(
      "train() takes the ConfigDict (it saves it with the run), not resolved Settings: pass "
      "the config that settings.resolve was given"
    )
  settings = settings_lib.resolve(config)
  run = Run(settings, dataset)
  runner = run.runner
  checkpointer = checkpoint_lib.Checkpointer(workdir, settings.checkpoint)
  config_json = dict(config_lib.to_json(config), image_shape=list(run.image_shape))
  state, data_state = run.initial_state(), None
  target = checkpoint_lib.abstract_like(
    state, runner.state_shardings(state) if runner.backend == "shard_map" else runner.sharding()
  )
  restored = checkpointer.restore_latest(target, config_json)
  if restored is not None:
    latest, state, data_state, _ = restored
    log.info("resumed from step %d of %s", latest, checkpointer.directory)
  feed = run.create_feed(data_state)  # refuses a data position this data cannot continue
  checkpointer.check_writable()  # the last check: it creates the workdir

  # --------------------------------------------------------------------------
  # State and outputs: the checks passed, so the run may write.
  # --------------------------------------------------------------------------
  state = runner.put(state, "state")
  checkpointer.start_writing()
  if outputs.is_writer():
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  writer = outputs.MetricWriter(workdir, resumed_from=restored[0] if restored else 0)
  log.info(
    "devices: %d x %s (%s backend), processes: %d; input pipeline: %s",
    runner.num_devices,
    runner.devices[0].device_kind,
    settings.parallel.backend,
    jax.process_count(),
    feed.name,
  )

  # --------------------------------------------------------------------------
  # Compile: the multi-step train function, with the state donated.
  # --------------------------------------------------------------------------
  train_fn = run.train_fn("indices" if feed.gathers else "batches")
  evaluator = Evaluator(runner, run.eval_images, settings.eval.batch_size)
  eval_rng = evaluation.eval_rng(settings.seed)

  def run_eval(step, final=False):
    params = runner.get(run.eval_params(state))
    diagnose = evaluation.final_evaluation if final else evaluation.periodic_evaluation
    row = diagnose(run, evaluator, params, eval_rng)
    writer.write(step, dict(row, final=final), split=settings.data.eval_split)
    if final:
      evaluation.write_json(
        workdir, evaluation.FINAL_FILE, dict(row, step=step, split=settings.data.eval_split)
      )
    sampling.save_image_grids(
      run, params, workdir, step, settings.eval.num_image_samples, settings.seed
    )
    return row

  # --------------------------------------------------------------------------
  # Loop: dispatch, and act on the host only at log/eval/checkpoint steps.
  # A signal stops it after the dispatch in flight, with a committed checkpoint.
  # --------------------------------------------------------------------------
  step = first_step = int(runner.get(state.step))
  pending, window_start, window_step = [], time.perf_counter(), step
  sizes_run = set()
  in_flight = dispatch.InFlight(runner.wait_timeout_s)
  progress = console.Progress(
    settings.num_steps, "step", "steps", plain_every_s=0.0, start_done=step
  )
  evaluations = scheduled_evaluations(settings.eval, settings.num_steps)
  if step == 0 and 0 in evaluations:
    run_eval(0)
  watcher = preemption.Watcher(checkpointer.manager)
  try:
    while step < settings.num_steps:
      n = next_dispatch_size(step, settings, evaluations)
      program = step_lib.program_for(train_fn, step, n)
      state, metrics = program(state, *feed.args(n))  # async: the next batches overlap compute
      in_flight.add(metrics)  # at most two dispatches queued: see runtime/dispatch.py
      pending.append((n, metrics))
      sizes_run.add((id(program), n))
      step += n
      logged = step % settings.log_every_steps == 0 or step == settings.num_steps
      if logged:
        check_no_recompilation(train_fn, sizes_run)
        row = _mean_rows([(k, runner.get(m)) for k, m in pending])
        now = time.perf_counter()
        row["examples_per_s"] = (step - window_step) * settings.batch_size / (now - window_start)
        row["learning_rate"] = float(run.schedule(step))
        row["epoch"] = feed.epoch
        row["wall_s"] = now - started  # since train() began: setup, compile, evals, saves
        writer.write(step, row)
        progress.update(
          step, f"loss {row['loss']:.2f}, rate {row['rate']:.2f}, {row['examples_per_s']:,.0f} ex/s"
        )
        _check_skips(
          runner.get(step_lib.consecutive_skips(state)),
          settings.max_consecutive_skips,
          step,
          checkpointer,
        )
        pending, window_start, window_step = [], time.perf_counter(), step
      eval_row = None
      if (
        every(step, settings.eval.every_steps) or step in evaluations
      ) and step < settings.num_steps:
        eval_row = run_eval(step)
      stop = watcher.should_stop(step)
      out_of_time = (
        logged
        and settings.time_budget_s
        and _all_agree(time.perf_counter() - started >= settings.time_budget_s)
      )
      if (
        stop
        or out_of_time
        or step == settings.num_steps
        or every(step, settings.checkpoint.every_steps)
      ):
        checkpointer.save(step, runner.unreplicate(state), feed.state(), config_json, eval_row)
        log.info(
          "checkpoint step %d: save() blocked the loop %.1f ms",
          step,
          1e3 * checkpointer.last_blocked_s,
        )
      if stop:
        checkpointer.close()  # waits for the commit
        log.warning(
          "stopped at step %d on %s: checkpoint committed in %s; rerun the same command to resume",
          step,
          signal.Signals(watcher.signum).name,
          checkpointer.directory,
        )
        raise preemption.Preempted(watcher.signum, step)
      if out_of_time:
        log.info(
          "time_budget_s=%s reached at step %d: evaluating that checkpoint",
          settings.time_budget_s,
          step,
        )
        break
  except DeviceTimeout:
    watcher.close()  # the runtime is wedged: waiting for a save would hang too
    progress.close()
    raise
  except BaseException:
    watcher.close()
    progress.close()
    try:  # let the last good checkpoint commit before the error propagates
      checkpointer.close()
    except Exception as e:  # the original error matters more
      log.error("%s", e)
    writer.close()
    raise
  watcher.close()

  # --------------------------------------------------------------------------
  # Final: wait for the last checkpoint, evaluate on the whole split.
  # --------------------------------------------------------------------------
  checkpointer.close()
  final = _already_evaluated(workdir, settings, step) if step == first_step else None
  if final is None:
    final = run_eval(step, final=True)
  writer.close()
  return final


def _already_evaluated(workdir, settings, step):
  """eval.json of a finished run when it matches these settings' final evaluation, else None.

  Rerunning a finished run (a second `make run`) then costs seconds, not the K=5000 pass.
  """
  try:
    with open(os.path.join(workdir, evaluation.FINAL_FILE)) as f:
      row = json.load(f)
  except (OSError, ValueError):
    return None
  num_examples, k = evaluation.final_settings(settings.eval)
  if (
    row.get("step") != step
    or row.get("split") != settings.data.eval_split
    or row.get("num_importance_samples") != k
    or (num_examples and row.get("num_examples") != num_examples)
  ):
    return None
  log.info(
    "step %d is already evaluated in %s/eval.json; `flaxvae evaluate --workdir %s` "
    "evaluates it again",
    step,
    workdir,
    workdir,
  )
  return row


def _all_agree(flag):
  """True when any process says so: every process must stop at the same step."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def _mean_rows(pending):
  """Step-weighted mean of the per-dispatch metric means (vectors stay lists)."""
  total = sum(n for n, _ in pending)
  keys = pending[0][1].keys()
  mean = lambda k: sum(n * np.asarray(m[k], np.float64) for n, m in pending) / total
  return {k: v.tolist() if np.ndim(v) else float(v) for k in keys for v in [mean(k)]}


def _check_skips(consecutive, max_consecutive_skips, step, checkpointer):
  if max_consecutive_skips and consecutive >= max_consecutive_skips:
    raise Diverged(
      f"{int(consecutive)} consecutive steps up to step {step} were skipped (non-finite loss "
      f"or gradients, or a gradient norm over the guard's threshold); last good checkpoint: "
      f"step {checkpointer.latest_step()} in {checkpointer.directory}. Lower "
      "optimizer.learning_rate or set optimizer.grad_clip_norm, then resume"
    )
