"""`flaxvae bench`: how fast the trainer's own compiled step runs, and how far from the limit.

    flaxvae bench --config configs/fashion_mnist_mlp.py [--steps N] [--cases all]

Each case compiles the same function `train.py` dispatches (the in-memory feed: indices into
the device-resident split, `config.steps_per_dispatch` steps per call) and prints one JSON line:
compile time, steady-state examples/s (median of timed windows after a warm-up dispatch),
FLOP/s from XLA's cost analysis of one compiled step, model-FLOP utilisation against a
matmul peak measured on the same host, memory analysis, devices and versions.

Cases: `default` (the config as is), `dispatch` (steps_per_dispatch x scan_unroll variants, to
show that a rolled loop suits the MLP and not convolutions on CPU), `scaling` (the same global
batch on 1, 2, 4, 8 devices, with the time of one gradient all-reduce), `profile` (XLA:CPU's
time per kind of op and the heaviest ops, from a trace of its thunks and the waits between
them), `depth`, `eval`. Timings on a shared machine are noisy: compare ratios from one
invocation.
"""
import glob
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from flaxvae import data as data_lib
from flaxvae.data import feeds, order
from flaxvae.errors import UsageError
from flaxvae.eval import diagnostics, evaluation
from flaxvae.eval.evaluator import Evaluator
from flaxvae.run import Run
from flaxvae.runtime import parallel, xla_flags
from flaxvae.train import checkpoint as checkpoint_lib

CASES = ("default", "dispatch", "scaling", "depth", "eval", "profile")
AOT_CHILD = "FLAXVAE_BENCH_AOT_CHILD"  # set in a child compiling for more devices than this one has
PROFILE_CHILD = "FLAXVAE_BENCH_PROFILE_CHILD"  # set in the child that traces XLA:CPU's thunks
TRACE_THUNKS = "--xla_cpu_enable_xprof_traceme=true"  # each thunk becomes a trace event


def matmul_peak(size=1024, seconds=1.0):
  """float32 matmul FLOP/s of the default device: the practical compute limit here."""
  a = jnp.ones((size, size), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  f(a, a).block_until_ready()
  best, deadline = 0.0, time.perf_counter() + seconds
  while time.perf_counter() < deadline:
    start = time.perf_counter()
    f(a, a).block_until_ready()
    best = max(best, 2 * size**3 / (time.perf_counter() - start))
  return best


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
  keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
          "generated_code_size_in_bytes")
  return {k: int(getattr(m, k)) for k in keys if hasattr(m, k)}


def _lower_one_step(run):
  """The one-step train function (1 device, no loop) lowered from shapes alone."""
  runner = parallel.Runner("shard_map", jax.devices()[:1])
  images = jax.ShapeDtypeStruct((run.config.batch_size, *run.image_shape), jnp.uint8,
                                sharding=runner.sharding(parallel.batch_axis(0), 4))
  initial = run.initial_state()
  state = checkpoint_lib.abstract_like(initial, runner.state_shardings(initial))
  return run.train_fn("one_step", runner=runner).lower(state, images)


def step_flops(run):
  """FLOPs of one train step of the global batch, from XLA's cost analysis (1 device, no loop).

  Cost analysis counts a loop body once, so it is taken on a single unrolled step.
  """
  return float(_cost(_lower_one_step(run).compile()).get("flops", 0.0))


def lowered_step_flops(config, image_shape):
  """FLOPs of one train step of the global batch, from XLA's cost analysis of the lowered
  (not compiled) one-device program, with stacked layers unrolled: a scanned loop's body would
  be counted once. Lowering only traces, so this costs seconds where compiling a deep model
  costs minutes; on the MLP, conv and VDVAE configs it is within 2% of the compiled count."""
  config = config.copy_and_resolve_references()
  if "scan_blocks" in config.model:
    with config.unlocked():
      config.model.scan_blocks = "unroll"
  run = Run(config, abstract=True, image_shape=tuple(image_shape))
  return float(_cost(_lower_one_step(run)).get("flops", 0.0))


def allreduce_seconds(runner, params, repeats=20):
  """Time of one mean all-reduce of a gradient-sized tree over the runner's devices."""
  if runner.num_devices == 1:
    return 0.0
  fn = runner.wrap(lambda g: jax.lax.pmean(g, parallel.AXIS), (parallel.REPLICATED,),
                   (parallel.REPLICATED,))
  grads = runner.put(params)
  jax.block_until_ready(fn(grads))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(grads))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def compiled_trainer(config, dataset=None):
  """(run, compiled dispatch, state, device-resident split, indices()) as train.py runs them:
  the in-memory feed, `config.steps_per_dispatch` steps per call; and the compile seconds."""
  run = Run(config, dataset)
  runner = run.runner
  images = run.train_images
  n = config.steps_per_dispatch
  train_fn = run.train_fn("indices")
  state = runner.put(run.initial_state(), "state")
  dataset = runner.put(images)
  stream = order.IndexStream(len(images), config.seed)

  def indices():
    idx = stream.take(n * config.batch_size).reshape(n, config.batch_size)
    return runner.put(idx, parallel.batch_axis(1))

  start = time.perf_counter()
  compiled = train_fn.lower(state, dataset, indices()).compile()
  return run, compiled, state, dataset, indices, time.perf_counter() - start


def time_trainer(config, *, steps=0, windows=5, window_seconds=2.0, dataset=None):
  """Compile and steady-state timings of train.py's dispatched function for `config`."""
  run, compiled, state, dataset, indices, compile_s = compiled_trainer(config, dataset)
  runner, n = run.runner, config.steps_per_dispatch
  start = time.perf_counter()
  state, metrics = compiled(state, dataset, indices())  # warm-up: first run, allocations
  jax.block_until_ready(metrics)
  first_dispatch_s = time.perf_counter() - start
  dispatches = max(1, -(-steps // n)) if steps else max(
      1, int(window_seconds / max(first_dispatch_s, 1e-4)))
  rates = []
  for _ in range(windows):
    start = time.perf_counter()
    for _ in range(dispatches):
      state, metrics = compiled(state, dataset, indices())
    jax.block_until_ready(metrics)
    rates.append(dispatches * n * config.batch_size / (time.perf_counter() - start))
  loss = float(runner.get(metrics)["loss"])
  return dict(run=run, runner=runner, compile_s=compile_s, first_dispatch_s=first_dispatch_s,
              examples_per_s=statistics.median(rates), window_rates=rates,
              steps_per_window=dispatches * n, memory=_memory(compiled), loss=loss,
              state=state)


def environment():
  import flax
  import optax
  devices = jax.devices()
  return dict(device_kind=devices[0].device_kind, platform=devices[0].platform,
              jax=jax.__version__, flax=flax.__version__, optax=optax.__version__,
              python=platform.python_version(), machine=platform.machine(), cpu=cpu_model(),
              glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),
              transparent_hugepages=transparent_hugepages())


def transparent_hugepages():
  """The kernel's THP mode (`always`, `madvise`, `never`): with `madvise`, huge pages come
  only where glibc asks for them (flaxvae/runtime/malloc.py); a streaming step depends on them."""
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return next((w[1:-1] for w in f.read().split() if w.startswith("[")), "")
  except OSError:
    return ""


def cpu_model():
  """The host CPU's model name (ratios measured on different CPUs do not compare)."""
  try:
    with open("/proc/cpuinfo") as f:
      return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                  platform.processor())
  except OSError:
    return platform.processor() or platform.machine()


def case_row(name, config, timing, flops_per_step, peak, num_devices, **extra):
  examples_per_s = timing["examples_per_s"]
  flops_per_s = flops_per_step * examples_per_s / config.batch_size
  peak_devices = peak  # simulated CPU devices share one host: its peak is the limit
  return dict(
      case=name, model=config.model.name, batch_size=config.batch_size, dtype=config.dtype,
      steps_per_dispatch=config.steps_per_dispatch, scan_unroll=config.scan_unroll,
      num_devices=num_devices, compile_s=round(timing["compile_s"], 2),
      step_ms=round(1000 * config.batch_size / examples_per_s, 3),
      examples_per_s=round(examples_per_s, 1),
      window_examples_per_s=[round(r) for r in timing["window_rates"]],
      steps_per_window=timing["steps_per_window"],
      flops_per_example=round(flops_per_step / config.batch_size),
      flop_per_s=round(flops_per_s), matmul_peak_flop_per_s=round(peak_devices),
      mfu=round(flops_per_s / peak_devices, 4),
      limit_examples_per_s=round(peak_devices * config.batch_size / max(flops_per_step, 1)),
      memory=timing["memory"], loss=round(timing["loss"], 3), **extra)


def dispatch_variants(config):
  """(steps_per_dispatch, scan_unroll) pairs that show the loop's effect on this model."""
  s = config.steps_per_dispatch if config.steps_per_dispatch > 1 else 4
  variants = [(1, 1), (s, 1), (s, s if s <= 8 else 4)]
  return [v for i, v in enumerate(variants) if v not in variants[:i]]


def run_cases(config, cases=CASES, *, steps=0, windows=5, device_counts=(1, 2, 4, 8),
              dataset=None, emit=print):
  """Runs the chosen cases; emits and returns one dict (a JSON line) per case."""
  peak = matmul_peak()
  env = environment()
  rows = []

  def record(row):
    row = dict(row, **env)
    rows.append(row)
    emit(json.dumps(row))

  def variant(**changes):
    c = config.copy_and_resolve_references()
    c.unlock()
    for key, value in changes.items():
      node, *path = key.split(".")
      target = c[node] if path else c
      target[path[0] if path else node] = value
    return c

  base = variant(**{"parallel.num_devices": 1})
  flops = None
  if "default" in cases:
    timing = time_trainer(base, steps=steps, windows=windows, dataset=dataset)
    flops = step_flops(timing["run"])
    dataset = timing["run"].dataset
    record(case_row("default", base, timing, flops, peak, 1))
  if flops is None:
    flops = step_flops(Run(base, dataset))
  if "dispatch" in cases:
    for spd, unroll in dispatch_variants(config):
      if (spd, unroll) == (config.steps_per_dispatch, config.scan_unroll) and "default" in cases:
        continue
      c = variant(steps_per_dispatch=spd, scan_unroll=unroll, **{"parallel.num_devices": 1})
      # A rolled conv loop is very slow on CPU: time it over fewer steps.
      timing = time_trainer(c, steps=steps, windows=windows if spd == 1 else 3, dataset=dataset)
      record(case_row("dispatch", c, timing, flops, peak, 1))
  if "eval" in cases:
    row = dict(eval_row(config, dataset), **env)
    rows.append(row)
    emit(json.dumps(row))
  if "profile" in cases:
    row = dict(op_profile(config, dataset=dataset), **env)
    rows.append(row)
    emit(json.dumps(row))
  if "depth" in cases:
    rows.extend(depth_rows(config, emit=lambda line: emit(json.dumps(dict(json.loads(line),
                                                                           **env)))))
  if "scaling" in cases:
    counts = [d for d in device_counts if d <= jax.device_count() and config.batch_size % d == 0]
    one = None
    for d in counts:
      c = variant(**{"parallel.num_devices": d})
      timing = time_trainer(c, steps=steps, windows=windows, dataset=dataset)
      reduce_s = allreduce_seconds(timing["runner"], timing["run"].params)
      step_s = config.batch_size / timing["examples_per_s"]
      one = step_s if one is None else one
      grad_bytes = sum(np.asarray(p).nbytes for p in jax.tree.leaves(timing["run"].params))
      record(case_row("scaling", c, timing, flops, peak, d, allreduce_bytes=grad_bytes,
                      allreduce_ms=round(1000 * reduce_s, 3),
                      overhead_vs_1_device=round(step_s / one - 1, 4),
                      allreduce_fraction_of_step=round(reduce_s / step_s, 4)))
  return rows


def in_child_with_devices(args, devices, marker, flags=()):
  """Reruns `flaxvae bench args` in a child process with `devices` simulated CPU devices (and
  `flags` added to XLA_FLAGS).

  Simulated devices split the host's threads, which slows even a one-device step (~20% for
  the conv VAE), so the other cases run in this process without them.
  """
  sys.stdout.flush()
  env = dict(os.environ, **{marker: "1"})
  for flag in (f"--xla_force_host_platform_device_count={devices}", *flags):
    xla_flags.add(flag, env)
  status = subprocess.run([sys.executable, "-m", "flaxvae.cli", "bench", *args],
                          env=env, check=False).returncode
  if status:
    raise UsageError(f"the {devices}-device child failed (exit status {status}); its error is above")


# ----------------------------------------------------------------------------
# Input-only benchmarks: examples/s each path delivers to the devices.
# ----------------------------------------------------------------------------
def bench_input(config, seconds=5.0, dispatch_steps=None):
  """{path: examples/s} of feeding config's train split to the devices, without training.

  Each path runs whole dispatches of `dispatch_steps` (default config.steps_per_dispatch) batches
  and waits until the batch is on device (in_memory: the indices plus the on-device gather).
  """
  runner = parallel.create_runner(config.parallel, config.batch_size)
  dataset = data_lib.open_dataset(config.data)
  n = dispatch_steps or config.steps_per_dispatch
  split = dataset.open_split(config.data.train_split)
  images = split.read_all()
  gather = jax.jit(lambda data, idx: data[idx])
  options = dict(seed=config.seed, batch_size=config.batch_size,
                 read_threads=config.data.read_threads,
                 prefetch_batches=config.data.prefetch_batches)

  def measure(produce):
    jax.block_until_ready(produce())  # warm-up: compile, threads started
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
      jax.block_until_ready(produce())
      count += n * config.batch_size
    return count / (time.perf_counter() - start)

  results = {}
  feed = feeds.create_feed(images, runner, **options)
  results["in_memory"] = measure(lambda: gather(*feed.args(n)))
  del feed
  feed = feeds.create_feed(split, runner, **options)
  results["streaming"] = measure(lambda: feed.args(n))
  results.update(dataset=config.data.name, examples=split.num_examples,
                 image_shape=list(split.image_shape), batch_size=config.batch_size,
                 steps_per_dispatch=n, read_threads=config.data.read_threads,
                 default_pipeline=data_lib.choose_pipeline(config.data, dataset,
                                                           config.data.train_split))
  return results


def bench_training(config, dispatches=3):
  """End-to-end train examples/s with each path and with synthetic device-resident batches.

  "synthetic" reuses one uint8 dispatch of batches already on device: the ceiling any input
  pipeline can reach. Each path runs `dispatches` whole dispatches after one for compilation.
  """
  n, results = config.steps_per_dispatch, {}
  for path in ("synthetic", "in_memory", "streaming"):
    c = config.copy_and_resolve_references()
    with c.unlocked():
      c.data.pipeline = "in_memory" if path == "synthetic" else path
    run = Run(c)
    feed = run.create_feed()
    if path == "synthetic":
      data = run.train_images
      batches = data[:n * c.batch_size].reshape(n, c.batch_size, *data.shape[1:])
      fixed = (run.runner.put(batches[:, feed.lo:feed.hi], parallel.batch_axis(1)),)
      fn, next_args = run.train_fn("batches"), lambda: fixed
    else:
      fn = run.train_fn("indices" if feed.gathers else "batches")
      next_args = lambda feed=feed: feed.args(n)
    state = run.runner.put(run.initial_state())
    state, metrics = fn(state, *next_args())
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(dispatches):
      state, metrics = fn(state, *next_args())  # async: the next args are made meanwhile
    jax.block_until_ready(metrics)
    results[path] = dispatches * n * c.batch_size / (time.perf_counter() - start)
  for path in ("in_memory", "streaming"):
    results[f"{path}_fraction_of_synthetic"] = results[path] / results["synthetic"]
  return results


# ----------------------------------------------------------------------------
# Ahead of time: compile without data or parameters, read XLA's analyses.
# ----------------------------------------------------------------------------
def _gib(nbytes):
  return round(nbytes / 2**30, 3)


def _compile_abstract(run, runner, batch, image_shape, n):
  abstract = run.initial_state()
  state = checkpoint_lib.abstract_like(abstract, runner.state_shardings(abstract))
  batches = jax.ShapeDtypeStruct((n, batch, *image_shape), jnp.uint8,
                                 sharding=runner.sharding(parallel.batch_axis(1), 5))
  start = time.perf_counter()
  compiled = run.train_fn("batches", runner).lower(state, batches).compile()
  return compiled, time.perf_counter() - start, state


def parse_bytes(text):
  """'80GB' / '16GiB' / '500MB' -> bytes."""
  text = str(text).strip().upper().replace("IB", "B")
  for unit, size in (("TB", 2**40), ("GB", 2**30), ("MB", 2**20), ("KB", 2**10), ("B", 1)):
    if text.endswith(unit):
      try:
        return int(float(text[:-len(unit)]) * size)
      except ValueError:
        break
  raise UsageError(f"--device_memory {text!r}: give a size like 80GB or 16GiB")


def aot_row(config, num_devices, image_shape=None, mesh=None, device_memory=None):
  """Compiles one train dispatch for `num_devices` from shapes alone and reports parameters,
  FLOPs per example (lowered_step_flops), per-device memory and compile time; with
  `device_memory` (bytes) also the largest global batch whose step fits it, from a second
  compile at twice the batch (activation memory grows linearly with the batch)."""
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
  leaves = lambda tree: jax.tree.leaves(tree)
  params = sum(int(np.prod(a.shape)) for a in leaves(state.params))
  shards = lambda tree: sum(int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize
                            for a in leaves(tree))
  row = dict(case="aot", model=config.model.name, num_devices=num_devices, mesh=mesh or "data",
             remat=bool(config.model.get("remat", False)), batch_size=batch,
             steps_per_dispatch=n, dtype=config.dtype, image_shape=list(image_shape),
             parameters=params, per_device_parameter_gib=_gib(shards(state.params)),
             per_device_optimizer_gib=_gib(shards(state.opt_state)),
             per_device_ema_gib=_gib(shards(state.ema_params)), compile_s=round(compile_s, 1),
             **{f"per_device_{k.replace('_size_in_bytes', '')}_gib": _gib(v)
                for k, v in memory.items()})
  row["flops_per_example"] = round(lowered_step_flops(config, image_shape) / batch)
  if device_memory:
    used = lambda m: m["argument_size_in_bytes"] + m["temp_size_in_bytes"]
    doubled, _, _ = _compile_abstract(run, runner, 2 * batch, image_shape, n)
    per_example = (used(_memory(doubled)) - used(memory)) / batch  # per global example
    fixed = used(memory) - per_example * batch
    fits = int((device_memory - fixed) // per_example) if per_example > 0 else 0
    row.update(device_memory_gib=_gib(device_memory),
               per_device_activation_gib_per_example=_gib(per_example),
               largest_batch=max(0, fits // num_devices * num_devices))
  return row


def run_aot(config, device_counts, device_memory=None, emit=print):
  """aot_row for each device count (this process must have them)."""
  rows = []
  for d in device_counts:
    if d <= jax.device_count():
      row = dict(aot_row(config, d, device_memory=device_memory), **environment())
      rows.append(row)
      emit(json.dumps(row))
  return rows


def depth_rows(config, depths=(4, 16, 64), emit=print):
  """Compile time and XLA's memory estimate against decoder depth, with and without scan over
  the stacked layers and rematerialisation (models with `scan_blocks` and `remat`: vdvae).

  The depth goes to the decoder's largest group of layers; everything else stays the config's.
  """
  rows = []
  spec = [tuple(int(v) for v in p.split(":")) for p in config.model.dec_layers.split(",")]
  largest = max(range(len(spec)), key=lambda i: spec[i][1])
  for depth in depths:
    for scan in ("unroll", "scan"):
      for remat in (False, True):
        c = config.copy_and_resolve_references()
        with c.unlocked():
          layers_spec = list(spec)
          layers_spec[largest] = (spec[largest][0], depth)
          c.model.dec_layers = ",".join(f"{r}:{n}" for r, n in layers_spec)
          c.model.scan_blocks, c.model.remat = scan, remat
          c.steps_per_dispatch = 1
        row = aot_row(c, 1)
        row = dict(row, case="depth", depth=depth, scan_blocks=scan, remat=remat)
        rows.append(row)
        emit(json.dumps(row))
  return rows


# ----------------------------------------------------------------------------
# Where the step's time goes: XLA:CPU's thunks, traced and grouped by kind.
# ----------------------------------------------------------------------------
OP_KINDS = ("convolution", "dot", "layout transpose or copy", "elementwise fusion",
            "control flow", "other")


def op_kind(name):
  """The kind of an HLO instruction, from the name XLA gives it (its root op, for fusions)."""
  n = name.lower()
  if "convolution" in n or n.startswith("conv_general"):
    return "convolution"
  if n.startswith(("dot", "ynn_fusion")) or "_dot" in n:  # YNNPACK fusions are its dots here
    return "dot"
  if "transpose" in n or n.startswith("copy"):
    return "layout transpose or copy"
  if n.startswith(("while", "conditional", "cond", "call")):
    return "control flow"
  if "fusion" in n or n.startswith("wrapped_"):
    return "elementwise fusion"
  return "other"


def _hlo_instructions(compiled):
  """{instruction name: its result shape} from the optimized HLO text."""
  out = {}
  for line in compiled.as_text().splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ", line)
    if m:
      out.setdefault(m.group(1), m.group(2))
  return out


def self_times(events):
  """[(name, self ns)] of (name, start, duration) events on one thread: each event's duration
  less the events nested inside it (a while loop's body runs inside the loop's event)."""
  out, stack = [], []  # stack: [name, end, self ns]
  for name, start, duration in sorted(events, key=lambda e: (e[1], -e[2])):
    while stack and stack[-1][1] <= start:
      out.append(tuple(stack.pop()[::2]))
    if stack:
      stack[-1][2] -= duration
    stack.append([name, start + duration, duration])
  return out + [tuple(e[::2]) for e in reversed(stack)]


# A wait (no traced op running) this long ends with an asynchronous op's completion, not with the
# executor's hand-off from one thunk to the next (a few microseconds).
LONG_WAIT_NS = 20_000
WAITING = "waiting (no op traced)"  # by_kind's entry for waits no asynchronous op explains


def untraced_waits(events, is_async):
  """({asynchronous op: ns waited on it}, other ns waiting): the wall time between the first
  and last of `events` [(name, start ns, end ns)], from every thread, that no event covers.

  XLA:CPU runs Eigen's convolutions on its intra-op pool after their thunk's trace event has
  ended, so their time shows up only as waits. A wait counts to the last asynchronous op
  (`is_async(name)`) that started since the last long wait (LONG_WAIT_NS, the last completion);
  other waits are the executor's hand-offs and idle time."""
  waited, other_ns = {}, 0
  in_flight, covered_until = None, None
  for name, start, end in sorted(events, key=lambda e: e[1]):
    if covered_until is not None and start > covered_until:
      wait = start - covered_until
      if in_flight is None:
        other_ns += wait
      else:
        waited[in_flight] = waited.get(in_flight, 0) + wait
      if wait >= LONG_WAIT_NS:
        in_flight = None
    if is_async(name):
      in_flight = name
    covered_until = end if covered_until is None else max(covered_until, end)
  return waited, other_ns


def trace_ops(dispatch, shapes, dispatches):
  """XLA:CPU's thunks while `dispatch()` runs `dispatches` times (it returns what to block on),
  for the instructions named in `shapes` ({name: result shape}, _hlo_instructions): per op, its
  self ns summed over threads plus, for a convolution, the waits for it (untraced_waits); the
  ns of those waits, the ns waiting otherwise, the wall seconds and the number of threads that
  ran ops. The process must have started its backend with TRACE_THUNKS in XLA_FLAGS."""
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    start = time.perf_counter()
    for _ in range(dispatches):
      out = dispatch()
    jax.block_until_ready(out)
    wall = time.perf_counter() - start
    jax.profiler.stop_trace()
    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    profile = jax.profiler.ProfileData.from_file(files[0])
  per_op, spans, threads = {}, [], 0
  for plane in profile.planes:
    for line in plane.lines:
      events = [(e.name, e.start_ns, e.duration_ns) for e in line.events if e.name in shapes]
      threads += bool(events)
      spans.extend((n, s, s + d) for n, s, d in events)
      for name, ns in self_times(events):
        per_op[name] = per_op.get(name, 0) + ns
  if not per_op:
    raise UsageError("the trace holds no XLA:CPU thunk events: was the profile case run "
                     f"without {TRACE_THUNKS} in XLA_FLAGS before JAX started?")
  waited, other_ns = untraced_waits(spans, lambda n: op_kind(n) == "convolution")
  for name, ns in waited.items():
    per_op[name] += ns
  return per_op, sum(waited.values()), other_ns, wall, threads


def op_profile(config, dispatches=3, top=12, dataset=None):
  """Where the trainer's compiled step spends its time: a jax.profiler trace of `dispatches`
  dispatches, with XLA:CPU's thunks traced (TRACE_THUNKS, set before the backend starts: the
  profile case runs in a child process), each thunk's self time summed per kind (OP_KINDS) and
  per instruction over every worker thread, in ms per training step, plus the waits no traced
  op covers. An op that splits its work over the pool in traced tasks counts each task; one
  that finishes after its thunk returns (Eigen's convolutions) counts its thunk and the waits
  for it (trace_ops), so a convolution's time is thread time plus wall time: shares of the
  step, not of core time."""
  if jax.default_backend() != "cpu":
    raise UsageError("--cases profile reads XLA:CPU's thunk trace: on an accelerator, trace "
                     "with jax.profiler and read it in TensorBoard or Perfetto")
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.parallel.num_devices = 1
  run, compiled, state, data, indices, _ = compiled_trainer(config, dataset)
  for _ in range(2):  # warm-up: first runs, allocations
    state, metrics = compiled(state, data, indices())
    jax.block_until_ready(metrics)
  shapes = _hlo_instructions(compiled)

  def dispatch():
    nonlocal state
    state, metrics = compiled(state, data, indices())
    return metrics
  per_op, async_ns, other_ns, wall, threads = trace_ops(dispatch, shapes, dispatches)
  steps = dispatches * config.steps_per_dispatch
  ms = lambda ns: round(ns / 1e6 / steps, 3)
  by_kind = {k: 0 for k in (*OP_KINDS, WAITING)}
  for name, ns in per_op.items():
    by_kind[op_kind(name)] += ns
  by_kind[WAITING] += other_ns
  busy = sum(per_op.values()) - async_ns
  total = sum(by_kind.values())
  heaviest = sorted(per_op.items(), key=lambda kv: -kv[1])[:top]
  return dict(case="profile", model=config.model.name, batch_size=config.batch_size,
              steps_per_dispatch=config.steps_per_dispatch, steps=steps, threads=threads,
              wall_ms_per_step=round(1000 * wall / steps, 3), busy_ms_per_step=ms(busy),
              convolution_wait_ms_per_step=ms(async_ns),
              ms_per_step_by_kind={k: ms(v) for k, v in by_kind.items()},
              share_by_kind={k: round(v / total, 4) for k, v in by_kind.items()},
              heaviest=[dict(op=n, kind=op_kind(n), shape=shapes[n], ms_per_step=ms(v))
                        for n, v in heaviest])


# ----------------------------------------------------------------------------
# Evaluation at the machine's limit: the K-sample importance pass and AIS.
# ----------------------------------------------------------------------------
def eval_row(config, dataset=None, num_examples=None, ais_examples=64):
  """Seconds of the final evaluation's importance pass (K = eval.final_num_importance_samples
  over eval.final_num_examples or the whole split) against its FLOP limit (XLA's cost of one
  chunk times the chunks, at the measured matmul peak), and AIS's cost per 1,000 images with
  the config's eval.ais_* settings. Random parameters: the cost does not depend on training."""
  c = config.eval
  run = Run(config, dataset, for_training=False)
  images = run.eval_images
  n = min(num_examples or c.final_num_examples or len(images), len(images))
  k = c.final_num_importance_samples
  evaluator = Evaluator(run.runner, images, c.batch_size)
  rng = evaluation.eval_rng(config)
  per_device = evaluator.batch_size // run.runner.num_devices
  chunk = diagnostics.chunk_size(k, per_device)

  def one_chunk(params, x, keys):
    model = run.model_with(params)
    return diagnostics.chunk_partials(diagnostics._terms_of(model, x), keys,
                                      jnp.arange(chunk), k)["lse"]
  x = jax.ShapeDtypeStruct((per_device, *run.image_shape), jnp.float32)
  keys = jax.ShapeDtypeStruct((per_device, 2), jnp.uint32)
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), run.params)
  chunk_flops = float(_cost(jax.jit(lambda p, x, kd: one_chunk(p, x, jax.vmap(
      jax.random.wrap_key_data)(kd))).lower(params, x, keys).compile()).get("flops", 0.0))
  flops = chunk_flops * (-(-k // chunk)) * (-(-n // per_device))
  evaluation.importance_values(run, evaluator, run.params, rng, evaluator.batch_size, k, None)
  start = time.perf_counter()  # compiled above: this is the pass alone
  evaluation.importance_values(run, evaluator, run.params, rng, n, k, None)
  seconds = time.perf_counter() - start
  peak = matmul_peak()  # the host's: simulated devices share it
  ais_fn = diagnostics.ais_fn(run.graphdef, run.protocol, c.ais_steps, c.ais_chains,
                              c.ais_leapfrog, c.ais_init)
  small = Evaluator(run.runner, images, ais_examples)
  small.per_example("ais", ais_fn, run.params, rng, ais_examples)  # compiles
  start = time.perf_counter()
  small.per_example("ais", ais_fn, run.params, rng, ais_examples)
  ais_seconds = time.perf_counter() - start
  return dict(case="eval", model=config.model.name, num_examples=n, num_importance_samples=k,
              seconds=round(seconds, 1), flop_limit_seconds=round(flops / peak, 1),
              ratio_to_limit=round(seconds / (flops / peak), 3), flops=flops,
              matmul_peak_flop_per_s=round(peak), ais_steps=c.ais_steps, ais_chains=c.ais_chains,
              ais_leapfrog=c.ais_leapfrog,
              ais_seconds_per_1000=round(ais_seconds * 1000 / ais_examples, 1),
              iwae_seconds_per_1000=round(seconds * 1000 / n, 1))
