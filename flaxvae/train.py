"""The trainer: one function, `train(config, workdir)`, in banner-commented stages.

    flaxvae train --config configs/fashion_mnist_mlp.py --workdir runs/mlp

The hot loop sends only example indices to the devices: the training split
lives on device, each dispatch runs `config.steps_per_dispatch` steps in one
jitted lax.scan, and metrics stay on device until a log step fetches them.
"""
import functools
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxvae import checkpoint as checkpoint_lib
from flaxvae import data as data_lib
from flaxvae import evaluate, guards, losses, models, optim, outputs, parallel, pipeline
from flaxvae import preemption
from flaxvae import step as step_lib
from flaxvae.models import ConfigError

log = logging.getLogger("flaxvae")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def validate(config):
  """Fails fast, before anything is read or written, on settings that cannot work."""
  for key in ("num_steps", "batch_size", "steps_per_dispatch", "scan_unroll", "log_every_steps"):
    if config[key] <= 0:
      raise ConfigError(f"{key} must be positive, got {config[key]}")
  if config.dtype not in DTYPES:
    raise ConfigError(f"unknown dtype {config.dtype!r}: choose one of {sorted(DTYPES)}")
  if config.objective.num_samples <= 0:
    raise ConfigError(f"objective.num_samples must be positive, got {config.objective.num_samples}")
  if config.data.binarization not in ("none", "dynamic", "static"):
    raise ConfigError(f"unknown data.binarization {config.data.binarization!r}: "
                      "use none, dynamic or static")
  if config.objective.name not in ("elbo", "iwae"):
    raise ConfigError(f"unknown objective.name {config.objective.name!r}: use elbo or iwae")
  models.check_config(config.model)
  evaluate.check_config(config.eval)
  optim.create_optimizer(config.optimizer, config.num_steps)
  losses.get_likelihood(config.objective.likelihood, config.objective.gaussian_logvar)


def event_boundaries(config):
  """Steps at which the host must act: log, evaluate, checkpoint or stop."""
  return [s for s in (config.log_every_steps, config.eval.every_steps,
                      config.checkpoint.every_steps) if s > 0]


def next_dispatch_size(step, config):
  """Steps to run in the next dispatch: steps_per_dispatch, or 1 when that would pass an event.

  Only these two sizes ever run, so the train function compiles at most twice.
  """
  limit = min(config.steps_per_dispatch, config.num_steps - step)
  for every in event_boundaries(config):
    limit = min(limit, every - step % every)
  return config.steps_per_dispatch if limit == config.steps_per_dispatch else 1


def check_no_recompilation(train_fn, sizes_run):
  """Cheap guard: one compilation per dispatch size, none after (jit backends only)."""
  cache_size = getattr(train_fn, "_cache_size", None)
  if cache_size is not None and cache_size() > len(sizes_run):
    raise RuntimeError(f"the train step compiled {cache_size()} times for dispatch sizes "
                       f"{sorted(sizes_run)}: an argument changed shape, dtype or sharding")


class Run:
  """The pieces of a run that evaluation, the API and the trainer all need."""

  def __init__(self, config, *, need_train_split=True):
    validate(config)
    self.config = config
    self.runner = parallel.create_runner(config.parallel, config.batch_size)
    self.likelihood = losses.get_likelihood(config.objective.likelihood,
                                            config.objective.gaussian_logvar)
    self.step_cfg = step_lib.step_config(config, self.likelihood)
    # The streaming path reads the train split per batch; only the in-memory path loads it here.
    self.pipeline = (data_lib.choose_pipeline(config.data, config.data.train_split)
                     if need_train_split else None)
    self.train_images = (data_lib.load_images(config.data, config.data.train_split)
                         if self.pipeline == "in_memory" else None)
    self.train_split = (pipeline.open_train_split(config)
                        if self.pipeline == "streaming" else None)
    self.eval_images = data_lib.load_images(config.data, config.data.eval_split)
    self.image_shape = tuple(self.eval_images.shape[1:])
    model = models.create_model(config.model, image_shape=self.image_shape,
                                num_params=self.likelihood.num_params, seed=config.seed,
                                dtype=DTYPES[config.dtype])
    self.graphdef, params = nnx.split(model)
    self.params = nnx.to_pure_dict(params)
    self.tx, self.schedule = optim.create_optimizer(config.optimizer, config.num_steps)

  def initial_state(self):
    params = self.params
    return step_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
        ema_params=params if self.config.ema_decay else (),
        rng=jax.random.key_data(jax.random.key(self.config.seed)),
        skipped=jnp.zeros((), jnp.int32), consecutive_skips=jnp.zeros((), jnp.int32),
        guard=guards.init(self.config.optimizer.get("adaptive_skip", 0.0),
                          self.config.optimizer.get("adaptive_skip_window", 200)))

  def eval_params(self, state):
    """The parameters evaluation uses: the EMA when the run keeps one."""
    return state.ema_params if self.config.ema_decay else state.params


# ----------------------------------------------------------------------------
# Image grids
# ----------------------------------------------------------------------------
def save_image_grids(run: Run, params, workdir, step):
  """Test reconstructions (originals above their reconstructions) and prior samples."""
  if not outputs.is_writer():
    return
  model = nnx.merge(run.graphdef, jax.tree.map(jnp.asarray, params))
  n = run.config.eval.num_image_samples
  x = run.eval_images[:n // 2].astype(np.float32) / 255.0
  mean, _ = model.encode(x)
  recon = run.likelihood.mean(model.decode(mean))
  z = jax.random.normal(jax.random.key(run.config.seed), (n, run.config.model.latent_dim))
  samples = run.likelihood.mean(model.decode(z))
  columns = max(1, n // 4)
  pairs = np.concatenate([x[:columns], recon[:columns], x[columns:2 * columns],
                          recon[columns:2 * columns]])
  images_dir = os.path.join(workdir, "images")
  os.makedirs(images_dir, exist_ok=True)
  outputs.save_image_grid(os.path.join(images_dir, f"reconstructions_{step:07d}.png"), pairs, columns)
  outputs.save_image_grid(os.path.join(images_dir, f"samples_{step:07d}.png"), samples)


def train(config, workdir):
  """Trains (or resumes) the run in `workdir`; returns the final evaluation row."""
  started = time.perf_counter()
  # --------------------------------------------------------------------------
  # Setup: everything that can fail on a bad config fails here, before writing.
  # --------------------------------------------------------------------------
  run = Run(config)
  runner = run.runner
  if run.train_images is not None and config.batch_size > len(run.train_images):
    raise ConfigError(f"batch_size {config.batch_size} is larger than the training split "
                      f"({len(run.train_images)} examples)")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise checkpoint_lib.CheckpointError(f"cannot create --workdir {workdir}: {e.strerror}") from None

  # --------------------------------------------------------------------------
  # State: fresh, or the newest readable checkpoint of this workdir (after
  # checking its config), before anything in the workdir is written.
  # --------------------------------------------------------------------------
  checkpointer = checkpoint_lib.Checkpointer(workdir, config.checkpoint)
  checkpointer.check_writable()
  config_json = checkpoint_lib.resolved_config(config)
  state = run.initial_state()
  data_state = None
  target = checkpoint_lib.abstract_like(state, runner.sharding())
  restored = checkpointer.restore_latest(target, config_json)
  if restored is not None:
    latest, state, data_state, _ = restored
    log.info("resumed from step %d of %s", latest, checkpointer.directory)
  state = runner.put(state)
  if outputs.is_writer():
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  writer = outputs.MetricWriter(workdir)
  log.info("devices: %d x %s (%s backend), processes: %d", runner.num_devices,
           runner.devices[0].device_kind, config.parallel.backend, jax.process_count())

  # --------------------------------------------------------------------------
  # Compile: the multi-step train function, with the state donated.
  # --------------------------------------------------------------------------
  # in_memory: train split on device, indices per dispatch; streaming: Grain uint8 batches.
  train_data = run.train_images if run.pipeline == "in_memory" else run.train_split
  feed = pipeline.create_feed(config, runner, train_data, data_state)
  log.info("input pipeline: %s", feed.name)
  train_fn = runner.wrap(
      functools.partial(feed.step_fn, run.graphdef, run.tx, run.step_cfg, config.scan_unroll),
      (parallel.REPLICATED, *feed.arg_kinds),
      (parallel.REPLICATED, parallel.REPLICATED), donate_argnums=(0,))
  evaluator = evaluate.Evaluator(runner, run.eval_images, config.eval.batch_size)
  eval_rng = evaluate.eval_rng(config)

  def run_eval(step, final=False):
    params = runner.get(run.eval_params(state))
    diagnose = evaluate.final_evaluation if final else evaluate.periodic_evaluation
    row = diagnose(run, evaluator, params, eval_rng)
    writer.write(step, dict(row, final=final), split=config.data.eval_split)
    if final and outputs.is_writer():
      evaluate.write_eval_json(workdir, dict(row, step=step, split=config.data.eval_split))
    save_image_grids(run, params, workdir, step)
    return row

  # --------------------------------------------------------------------------
  # Loop: dispatch, and act on the host only at log/eval/checkpoint steps.
  # A signal stops it after the dispatch in flight, with a committed checkpoint.
  # --------------------------------------------------------------------------
  step = first_step = int(runner.get(state.step))
  pending, window_start, window_step = [], time.perf_counter(), step
  sizes_run = set()
  progress = _progress(step, config.num_steps)
  watcher = preemption.Watcher(checkpointer.manager)
  try:
    while step < config.num_steps:
      n = next_dispatch_size(step, config)
      state, metrics = train_fn(state, *feed.args(n))  # async: the next batches overlap compute
      pending.append((n, metrics))
      sizes_run.add(n)
      step += n
      if step % config.log_every_steps == 0 or step == config.num_steps:
        check_no_recompilation(train_fn, sizes_run)
        row = _mean_rows([(k, runner.get(m)) for k, m in pending])
        now = time.perf_counter()
        row["examples_per_s"] = (step - window_step) * config.batch_size / (now - window_start)
        row["learning_rate"] = float(run.schedule(step))
        row["epoch"] = feed.epoch
        row["wall_s"] = now - started  # since train() began: setup, compile, evals, saves
        writer.write(step, row)
        progress(step, row)
        _check_skips(runner.get(state.consecutive_skips), config, step, checkpointer)
        pending, window_start, window_step = [], time.perf_counter(), step
      eval_row = None
      if config.eval.every_steps and step % config.eval.every_steps == 0 and step < config.num_steps:
        eval_row = run_eval(step)
      stop = watcher.should_stop(step)
      if stop or step % config.checkpoint.every_steps == 0 or step == config.num_steps:
        checkpointer.save(step, runner.unreplicate(state), feed.state(), config_json, eval_row)
        log.info("checkpoint step %d: save() blocked the loop %.1f ms", step,
                 1e3 * checkpointer.last_blocked_s)
      if stop:
        checkpointer.close()  # waits for the commit
        log.warning("stopped at step %d on %s: checkpoint committed in %s; rerun the same "
                    "command to resume", step, preemption.signal.Signals(watcher.signum).name,
                    checkpointer.directory)
        raise preemption.Preempted(watcher.signum, step)
  except BaseException:
    watcher.close()
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
  final = _already_evaluated(workdir, config, step) if step == first_step else None
  if final is None:
    final = run_eval(step, final=True)
  writer.close()
  return final


def _already_evaluated(workdir, config, step):
  """eval.json of a finished run when it matches this config's final evaluation, else None.

  Rerunning a finished run (a second `make run`) then costs seconds, not the K=5000 pass.
  """
  try:
    with open(os.path.join(workdir, "eval.json")) as f:
      row = json.load(f)
  except (OSError, ValueError):
    return None
  c = config.eval
  if (row.get("step") != step or row.get("split") != config.data.eval_split
      or row.get("num_importance_samples") != c.final_num_importance_samples
      or (c.final_num_examples and row.get("num_examples") != c.final_num_examples)):
    return None
  log.info("step %d is already evaluated in %s/eval.json; `flaxvae evaluate --workdir %s` "
           "evaluates it again", step, workdir, workdir)
  return row


def _mean_rows(pending):
  """Step-weighted mean of the per-dispatch metric means."""
  total = sum(n for n, _ in pending)
  keys = pending[0][1].keys()
  return {k: float(sum(n * float(m[k]) for n, m in pending) / total) for k in keys}


def _check_skips(consecutive, config, step, checkpointer):
  if config.max_consecutive_skips and consecutive >= config.max_consecutive_skips:
    raise FloatingPointError(
        f"{int(consecutive)} consecutive steps up to step {step} were skipped (non-finite loss "
        f"or gradient, or gradient norm above the skip threshold); last good checkpoint: step {checkpointer.latest_step()} in "
        f"{checkpointer.directory}. Lower optimizer.learning_rate or set grad_clip_norm")


def _progress(start, total):
  """A one-line console progress display (process 0 only)."""
  begin = time.perf_counter()

  def show(step, row):
    if not outputs.is_writer():
      return
    done = step / total
    bar = "#" * int(30 * done) + "." * (30 - int(30 * done))
    print(f"\r[{bar}] step {step}/{total} loss {row['loss']:.2f} rate {row['rate']:.2f} "
          f"{row['examples_per_s']:,.0f} ex/s {time.perf_counter() - begin:.0f}s",
          end="\n" if step == total else "", flush=True)
  return show
