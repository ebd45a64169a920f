"""`flaxvae bench`: what a user asks of their own config before spending machine time on it.

    flaxvae bench --config configs/fashion_mnist_mlp.py [--steps N] [--windows W]
    flaxvae bench --aot --config configs/cifar10_vdvae.py [--devices 1,8] [--device_memory 80GB]
        [--mesh data:2,fsdp:4] [--image_shape 512,512,3]

The first compiles the function `train.py` dispatches (the in-memory feed: indices into the
device-resident split, `config.steps_per_dispatch` steps per call) and prints one JSON line:
compile time, steady-state examples/s (median of timed windows after a warm-up dispatch),
FLOPs per example from XLA's cost analysis, model-FLOP utilisation against a matmul peak
measured on the same host, memory analysis, devices and versions. The second compiles from
shapes alone (nothing runs, no data is read): parameters, FLOPs per example, per-device memory
and, given a device's memory, the largest batch whose step fits it.

The benchmark lab (dispatch and scaling variants, op profiles, the peers, input pipelines)
lives in the repository's benchmarks/, built on these functions.
"""

import json
import os
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from flaxvae import data as data_lib
from flaxvae import defaults
from flaxvae.data import order
from flaxvae.errors import UsageError
from flaxvae.run import Run
from flaxvae.runtime import parallel, timing, xla_flags
from flaxvae.train import checkpoint as checkpoint_lib
from flaxvae.train import step as step_lib

AOT_CHILD = "FLAXVAE_BENCH_AOT_CHILD"  # set in a child compiling for more devices than this one has


def matmul_peak(size=1024, seconds=1.0):
  """float32 matmul FLOP/s of the default device: the practical compute limit here."""
  a = jnp.ones((size, size), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  measured = timing.time_calls(lambda: f(a, a), wait=jax.block_until_ready, seconds=seconds)
  return measured.best_rate(2 * size**3)


def _cost(compiled):
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return analysis or {}


def _memory(compiled):
  try:
    m = compiled.memory_analysis()
  except Exception:  # some backends do not implement it
    return None
  if m is None:
    return None
  keys = (
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "temp_size_in_bytes",
    "generated_code_size_in_bytes",
  )
  return {k: int(getattr(m, k)) for k in keys if hasattr(m, k)}


def _lower_one_step(run, at_step=None):
  """The one-step train function (1 device, no loop) lowered from shapes alone: the full
  program, or with `at_step` the one the trainer runs for that step (without a later-starting
  discriminator's branches on XLA:CPU, step.program_for)."""
  runner = parallel.Runner("shard_map", jax.devices()[:1])
  images = jax.ShapeDtypeStruct(
    (run.settings.batch_size, *run.image_shape),
    jnp.uint8,
    sharding=runner.sharding(parallel.batch_axis(0), 4),
  )
  initial = run.initial_state()
  state = checkpoint_lib.abstract_like(initial, runner.state_shardings(initial))
  train_fn = run.train_fn("one_step", runner=runner)
  if at_step is not None:
    train_fn = step_lib.program_for(train_fn, at_step, 1)
  return train_fn.lower(state, images)


def step_flops(run):
  """FLOPs of one train step of the global batch, from XLA's cost analysis (1 device, no loop).

  Cost analysis counts a loop body once, so it is taken on a single unrolled step. The program
  is the one the trainer runs at the initial step, which compiled_trainer times.
  """
  return float(_cost(_lower_one_step(run, at_step=0).compile()).get("flops", 0.0))


def lowered_step_flops(config, image_shape):
  """FLOPs of one train step of the global batch, from XLA's cost analysis of the lowered
  (not compiled) one-device program, with stacked layers unrolled: a scanned loop's body would
  be counted once. Lowering only traces, so this costs seconds where compiling a deep model
  costs minutes; on the MLP, conv and VDVAE configs it agrees closely with the compiled count
  (step_flops), which is why the FLOP columns can use it."""
  config = config.copy_and_resolve_references()
  if "scan_blocks" in config.model:  # VDVAE names the choice, the KL autoencoder's is a bool
    with config.unlocked():
      scanned = config.model.scan_blocks
      config.model.scan_blocks = "unroll" if isinstance(scanned, str) else False
  run = Run(config, abstract=True, image_shape=tuple(image_shape))
  return float(_cost(_lower_one_step(run)).get("flops", 0.0))


def compiled_trainer(config, dataset=None):
  """(run, compiled dispatch, state, device-resident split, indices()) as train.py runs them:
  the in-memory feed, `config.steps_per_dispatch` steps per call; and the compile seconds."""
  run = Run(config, dataset)
  runner = run.runner
  images = run.train_images
  n = config.steps_per_dispatch
  train_fn = step_lib.program_for(run.train_fn("indices"), 0, n)  # the initial state's step
  state = runner.put(run.initial_state(), "state")
  dataset = runner.put(images)
  stream = order.IndexStream(len(images), config.seed)

  def indices():
    idx = stream.take(n * config.batch_size).reshape(n, config.batch_size)
    return runner.put(idx, parallel.batch_axis(1))

  start = time.perf_counter()
  compiled = _as_called(train_fn, train_fn.lower(state, dataset, indices()).compile())
  return run, compiled, state, dataset, indices, time.perf_counter() - start


def _as_called(train_fn, compiled):
  """`compiled` taking the arguments `train_fn` takes: a step with frozen networks' weights
  (LPIPS's, step.WithConstants) gets them bound as the jitted function has them."""
  if isinstance(train_fn, step_lib.WithConstants):
    return step_lib.WithConstants(compiled, train_fn.constants)
  return compiled


def time_trainer(config, *, steps=0, windows=5, window_seconds=2.0, dataset=None):
  """Compile and steady-state timings of train.py's dispatched function for `config`."""
  run, compiled, state, dataset, indices, compile_s = compiled_trainer(config, dataset)
  runner, n = run.runner, config.steps_per_dispatch
  metrics = None

  def dispatch():
    nonlocal state, metrics
    state, metrics = compiled(state, dataset, indices())
    return metrics

  measured = timing.time_calls(
    dispatch,
    wait=jax.block_until_ready,
    windows=windows,
    calls_per_window=max(1, -(-steps // n)) if steps else None,
    window_seconds=window_seconds,
  )
  rates = measured.rates(n * config.batch_size)
  loss = float(runner.get(metrics)["loss"])
  return dict(
    run=run,
    runner=runner,
    compile_s=compile_s,
    first_dispatch_s=measured.warmup_s,
    examples_per_s=measured.median_rate(n * config.batch_size),
    window_rates=rates,
    steps_per_window=measured.calls_per_window * n,
    memory=_memory(getattr(compiled, "jitted", compiled)),
    loss=loss,
    state=state,
  )


def environment():
  """The devices and the versions a row was measured with."""
  import flax  # noqa: PLC0415
  import optax  # noqa: PLC0415

  devices = jax.devices()
  return dict(
    device_kind=devices[0].device_kind,
    platform=devices[0].platform,
    jax=jax.__version__,
    flax=flax.__version__,
    optax=optax.__version__,
    python=platform.python_version(),
    machine=platform.machine(),
  )


def case_row(name, config, measured, flops_per_step, peak, num_devices, **extra):
  """One JSON row of a timed case (time_trainer's `measured`) against the FLOP limit."""
  examples_per_s = measured["examples_per_s"]
  flops_per_s = flops_per_step * examples_per_s / config.batch_size
  peak_devices = peak  # simulated CPU devices share one host: its peak is the limit
  return dict(
    case=name,
    model=config.model.name,
    batch_size=config.batch_size,
    dtype=config.dtype,
    steps_per_dispatch=config.steps_per_dispatch,
    scan_unroll=config.scan_unroll,
    num_devices=num_devices,
    compile_s=round(measured["compile_s"], 2),
    step_ms=round(1000 * config.batch_size / examples_per_s, 3),
    examples_per_s=round(examples_per_s, 1),
    window_examples_per_s=[round(r) for r in measured["window_rates"]],
    steps_per_window=measured["steps_per_window"],
    flops_per_example=round(flops_per_step / config.batch_size),
    flop_per_s=round(flops_per_s),
    matmul_peak_flop_per_s=round(peak_devices),
    mfu=round(flops_per_s / peak_devices, 4),
    limit_examples_per_s=round(peak_devices * config.batch_size / max(flops_per_step, 1)),
    memory=measured["memory"],
    loss=round(measured["loss"], 3),
    **extra,
  )


def with_keys(config, **changes):
  """A resolved, unlocked copy of `config` with {"a.b": value} set (dotted keys)."""
  config = config.copy_and_resolve_references()
  config.unlock()
  return defaults.set_keys(config, **changes)


def throughput(config, *, steps=0, windows=5, dataset=None):
  """The trainer's steady-state examples/s, FLOPs and MFU on one device, as one row."""
  config = with_keys(config, **{"parallel.num_devices": 1})
  measured = time_trainer(config, steps=steps, windows=windows, dataset=dataset)
  flops = step_flops(measured["run"])
  return dict(case_row("default", config, measured, flops, matmul_peak(), 1), **environment())


def in_child_with_devices(command, devices, marker, flags=()):
  """Runs `python command...` in a child process with `devices` simulated CPU devices (and
  `flags` added to XLA_FLAGS) and `marker` set in its environment.

  The device count is read once, when JAX starts a backend, and simulated devices split the
  host's threads, so only what needs them runs in the child."""
  sys.stdout.flush()
  env = dict(os.environ, **{marker: "1"})
  for flag in (f"--xla_force_host_platform_device_count={devices}", *flags):
    xla_flags.add(flag, env)
  status = subprocess.run([sys.executable, *command], env=env, check=False).returncode
  if status:
    raise UsageError(
      f"the {devices}-device child failed (exit status {status}); its error is above"
    )


# ----------------------------------------------------------------------------
# Ahead of time: compile without data or parameters, read XLA's analyses.
# ----------------------------------------------------------------------------
def _gib(nbytes):
  return round(nbytes / 2**30, 3)


def _compile_abstract(run, runner, batch, image_shape, n):
  abstract = run.initial_state()
  state = checkpoint_lib.abstract_like(abstract, runner.state_shardings(abstract))
  batches = jax.ShapeDtypeStruct(
    (n, batch, *image_shape), jnp.uint8, sharding=runner.sharding(parallel.batch_axis(1), 5)
  )
  start = time.perf_counter()
  compiled = run.train_fn("batches", runner).lower(state, batches).compile()
  return compiled, time.perf_counter() - start, state


def parse_bytes(text):
  """'80GB' / '16GiB' / '500MB' -> bytes."""
  text = str(text).strip().upper().replace("IB", "B")
  for unit, size in (("TB", 2**40), ("GB", 2**30), ("MB", 2**20), ("KB", 2**10), ("B", 1)):
    if text.endswith(unit):
      try:
        return int(float(text[: -len(unit)]) * size)
      except ValueError:
        break
  raise UsageError(f"--device_memory {text!r}: give a size like 80GB or 16GiB")


def parse_image_shape(text):
  """'512' (square, 3 channels) / '512,512' / '512,512,3' -> (H, W, C)."""
  try:
    dims = tuple(int(d) for d in str(text).replace("x", ",").split(",") if d.strip())
  except ValueError:
    dims = ()
  if len(dims) == 1:
    dims = (dims[0], dims[0], 3)
  elif len(dims) == 2:
    dims = (*dims, 3)
  if len(dims) != 3 or min(dims) < 1:
    raise UsageError(f"--image_shape {text!r}: give H,W,C like 512,512,3 (or 512 for 512,512,3)")
  return dims


def _shard_bytes(tree):
  """Bytes of `tree`'s arrays (ShapeDtypeStructs with shardings) held by one device."""
  return sum(
    int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize for a in jax.tree.leaves(tree)
  )


def _size(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def player_memory(state):
  """Per-device GiB of each player's state (parameters, optimizer state, EMA; the
  discriminator's BatchNorm statistics) from its shapes and shardings, and the parameter
  counts: what the state costs before the step's activations."""
  row = dict(
    parameters=_size(state.params),
    per_device_parameter_gib=_gib(_shard_bytes(state.params)),
    per_device_optimizer_gib=_gib(_shard_bytes(state.opt_state)),
    per_device_ema_gib=_gib(_shard_bytes(state.ema_params)),
  )
  if state.adversary:
    adversary = state.adversary
    row.update(
      adversary_parameters=_size(adversary.params),
      per_device_adversary_parameter_gib=_gib(_shard_bytes(adversary.params)),
      per_device_adversary_optimizer_gib=_gib(_shard_bytes(adversary.opt_state)),
      per_device_adversary_stats_gib=_gib(_shard_bytes(adversary.stats)),
    )
  return row


def aot_row(config, num_devices, image_shape=None, mesh=None, device_memory=None):
  """Compiles one train dispatch for `num_devices` from shapes alone and reports parameters,
  FLOPs per example (lowered_step_flops), per-device memory of each player's state and of the
  compiled step, and compile time; with `device_memory` (bytes) also the largest global batch
  whose step fits it, from a second compile at twice the batch (activation memory grows
  linearly with the batch). `image_shape` (H, W, C): else the dataset's."""
  image_shape = tuple(image_shape or data_lib.open_dataset(config.data).image_shape)
  run = Run(config, abstract=True, image_shape=image_shape)
  mesh = config.parallel.mesh if mesh is None else mesh
  _, fsdp = parallel.parse_mesh(mesh, num_devices)
  runner = parallel.Runner("shard_map", jax.devices()[:num_devices], fsdp=fsdp)
  n, batch = config.steps_per_dispatch, config.batch_size
  if batch % num_devices:
    raise UsageError(f"batch_size {batch} does not split over {num_devices} devices")
  compiled, compile_s, state = _compile_abstract(run, runner, batch, image_shape, n)
  memory = _memory(compiled) or {}
  row = dict(
    case="aot",
    model=config.model.name,
    num_devices=num_devices,
    mesh=mesh or "data",
    remat=bool(config.model.get("remat", False)),
    batch_size=batch,
    steps_per_dispatch=n,
    dtype=config.dtype,
    image_shape=list(image_shape),
    **player_memory(state),
    compile_s=round(compile_s, 1),
    **{f"per_device_{k.replace('_size_in_bytes', '')}_gib": _gib(v) for k, v in memory.items()},
  )
  row["flops_per_example"] = round(lowered_step_flops(config, image_shape) / batch)
  if device_memory:
    used = lambda m: m["argument_size_in_bytes"] + m["temp_size_in_bytes"]
    doubled, _, _ = _compile_abstract(run, runner, 2 * batch, image_shape, n)
    per_example = (used(_memory(doubled)) - used(memory)) / batch  # per global example
    fixed = used(memory) - per_example * batch
    fits = int((device_memory - fixed) // per_example) if per_example > 0 else 0
    row.update(
      device_memory_gib=_gib(device_memory),
      per_device_activation_gib_per_example=_gib(per_example),
      largest_batch=max(0, fits // num_devices * num_devices),
      largest_batch_per_device=max(0, fits // num_devices),
    )
  return row


def run_aot(config, device_counts, device_memory=None, emit=print, image_shape=None):
  """aot_row for each device count (this process must have them)."""
  rows = []
  for d in device_counts:
    if d <= jax.device_count():
      row = aot_row(config, d, image_shape=image_shape, device_memory=device_memory)
      row = dict(row, **environment())
      rows.append(row)
      emit(json.dumps(row))
  return rows
