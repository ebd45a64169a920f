"""Where the trainer's step spends its time on XLA:CPU: its thunks traced by jax.profiler,
grouped by kind of op and by instruction (`benchmarks/cases.py --cases profile`).

The process must start its backend with TRACE_THUNKS in XLA_FLAGS, so cases.py runs the
profile in a child process.
"""

import glob
import os
import re
import tempfile

import jax

from flaxvae import bench
from flaxvae.runtime import timing

TRACE_THUNKS = "--xla_cpu_enable_xprof_traceme=true"  # each thunk becomes a trace event


# ----------------------------------------------------------------------------
OP_KINDS = (
  "convolution",
  "dot",
  "layout transpose or copy",
  "elementwise fusion",
  "control flow",
  "other",
)


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
    wall = timing.time_calls(
      dispatch, wait=jax.block_until_ready, warmup=0, calls_per_window=dispatches
    ).window_s[0]
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
    raise RuntimeError(
      "the trace holds no XLA:CPU thunk events: was the profile case run "
      f"without {TRACE_THUNKS} in XLA_FLAGS before JAX started?"
    )
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
    raise RuntimeError(
      "--cases profile reads XLA:CPU's thunk trace: on an accelerator, trace "
      "with jax.profiler and read it in TensorBoard or Perfetto"
    )
  config = bench.with_keys(config, **{"parallel.num_devices": 1})
  _, compiled, state, data, indices, _ = bench.compiled_trainer(config, dataset)
  shapes = _hlo_instructions(compiled)

  def dispatch():
    nonlocal state
    state, metrics = compiled(state, data, indices())
    return metrics

  # warm-up, untraced: first runs, allocations
  timing.time_calls(dispatch, wait=jax.block_until_ready, warmup=2, windows=0)
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
  return dict(
    case="profile",
    model=config.model.name,
    batch_size=config.batch_size,
    steps_per_dispatch=config.steps_per_dispatch,
    steps=steps,
    threads=threads,
    wall_ms_per_step=round(1000 * wall / steps, 3),
    busy_ms_per_step=ms(busy),
    convolution_wait_ms_per_step=ms(async_ns),
    ms_per_step_by_kind={k: ms(v) for k, v in by_kind.items()},
    share_by_kind={k: round(v / total, 4) for k, v in by_kind.items()},
    heaviest=[dict(op=n, kind=op_kind(n), shape=shapes[n], ms_per_step=ms(v)) for n, v in heaviest],
  )
