"""The benchmark lab's step cases: the trainer's compiled step under variants, one JSON line
per case (BENCHMARKS.md's tables are drawn from them by benchmarks/report.py).

    .venv/bin/python benchmarks/cases.py --config configs/fashion_mnist_mlp.py
        [--cases default,dispatch,scaling,depth,eval,profile] [--steps N] [--windows W]

Cases: `default` (the config as is: what `flaxvae bench --config` prints), `dispatch`
(steps_per_dispatch x scan_unroll variants, to show that a rolled loop suits the MLP and not
convolutions on CPU), `scaling` (the same global batch on 1, 2, 4, 8 simulated devices, with
the time of one gradient all-reduce), `profile` (XLA:CPU's time per kind of op and the heaviest
ops: op_profile.py), `depth` (compile time and memory against decoder depth, with and without
scan and remat), `eval` (the final evaluation against its FLOP limit). Every row carries the
devices, versions and machine (machine.py). Timings on a shared machine are noisy: compare
ratios from one invocation.
"""

import os
import sys

import flaxvae

if __name__ == "__main__":  # before JAX starts: the process defaults `flaxvae bench` runs with
  flaxvae.apply_process_defaults(malloc=True)

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from flaxvae import bench
from flaxvae.eval import diagnostics, evaluation
from flaxvae.eval.evaluator import Evaluator
from flaxvae.run import Run
from flaxvae.runtime import parallel, timing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine
import op_profile

CASES = ("default", "dispatch", "scaling", "depth", "eval", "profile")
SCALING_CHILD = "FLAXVAE_BENCH_SCALING_CHILD"  # set in the scaling case's 8-device child
PROFILE_CHILD = "FLAXVAE_BENCH_PROFILE_CHILD"  # set in the child that traces XLA:CPU's thunks


def environment():
  """Devices, versions and machine of a row."""
  return dict(bench.environment(), **machine.machine())


def allreduce_seconds(runner, params, repeats=20):
  """Time of one mean all-reduce of a gradient-sized tree over the runner's devices."""
  if runner.num_devices == 1:
    return 0.0
  fn = runner.wrap(
    lambda g: jax.lax.pmean(g, parallel.AXIS), (parallel.REPLICATED,), (parallel.REPLICATED,)
  )
  grads = runner.put(params)
  return timing.time_calls(
    lambda: fn(grads), wait=jax.block_until_ready, windows=repeats
  ).median_s()


def dispatch_variants(config):
  """(steps_per_dispatch, scan_unroll) pairs that show the loop's effect on this model."""
  s = config.steps_per_dispatch if config.steps_per_dispatch > 1 else 4
  variants = [(1, 1), (s, 1), (s, s if s <= 8 else 4)]
  return [v for i, v in enumerate(variants) if v not in variants[:i]]


def run_cases(
  config, cases=CASES, *, steps=0, windows=5, device_counts=(1, 2, 4, 8), dataset=None, emit=print
):
  """Runs the chosen cases; emits and returns one dict (a JSON line) per case."""
  peak = bench.matmul_peak()
  env = environment()
  rows = []

  def record(row):
    row = dict(row, **env)
    rows.append(row)
    emit(json.dumps(row))

  base = bench.with_keys(config, **{"parallel.num_devices": 1})
  flops = None
  if "default" in cases:
    measured = bench.time_trainer(base, steps=steps, windows=windows, dataset=dataset)
    flops = bench.step_flops(measured["run"])
    dataset = measured["run"].dataset
    record(bench.case_row("default", base, measured, flops, peak, 1))
  if flops is None:
    flops = bench.step_flops(Run(base, dataset))
  if "dispatch" in cases:
    for spd, unroll in dispatch_variants(config):
      if (spd, unroll) == (config.steps_per_dispatch, config.scan_unroll) and "default" in cases:
        continue
      c = bench.with_keys(
        config, steps_per_dispatch=spd, scan_unroll=unroll, **{"parallel.num_devices": 1}
      )
      # A rolled conv loop is very slow on CPU: time it over fewer steps.
      measured = bench.time_trainer(
        c, steps=steps, windows=windows if spd == 1 else 3, dataset=dataset
      )
      record(bench.case_row("dispatch", c, measured, flops, peak, 1))
  if "eval" in cases:
    row = dict(eval_row(config, dataset), **env)
    rows.append(row)
    emit(json.dumps(row))
  if "profile" in cases:
    row = dict(op_profile.op_profile(config, dataset=dataset), **env)
    rows.append(row)
    emit(json.dumps(row))
  if "depth" in cases:
    rows.extend(
      depth_rows(config, emit=lambda line: emit(json.dumps(dict(json.loads(line), **env))))
    )
  if "scaling" in cases:
    counts = [d for d in device_counts if d <= jax.device_count() and config.batch_size % d == 0]
    one = None
    for d in counts:
      c = bench.with_keys(config, **{"parallel.num_devices": d})
      measured = bench.time_trainer(c, steps=steps, windows=windows, dataset=dataset)
      reduce_s = allreduce_seconds(measured["runner"], measured["run"].params)
      step_s = config.batch_size / measured["examples_per_s"]
      one = step_s if one is None else one
      grad_bytes = sum(np.asarray(p).nbytes for p in jax.tree.leaves(measured["run"].params))
      record(
        bench.case_row(
          "scaling",
          c,
          measured,
          flops,
          peak,
          d,
          allreduce_bytes=grad_bytes,
          allreduce_ms=round(1000 * reduce_s, 3),
          overhead_vs_1_device=round(step_s / one - 1, 4),
          allreduce_fraction_of_step=round(reduce_s / step_s, 4),
        )
      )
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
        row = bench.aot_row(c, 1)
        row = dict(row, case="depth", depth=depth, scan_blocks=scan, remat=remat)
        rows.append(row)
        emit(json.dumps(row))
  return rows


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
  rng = evaluation.eval_rng(config.seed)
  per_device = evaluator.batch_size // run.runner.num_devices
  chunk = diagnostics.chunk_size(k, per_device)

  def one_chunk(params, x, keys):
    model = run.model_with(params)
    return diagnostics.chunk_partials(diagnostics._terms_of(model, x), keys, jnp.arange(chunk), k)[
      "lse"
    ]

  x = jax.ShapeDtypeStruct((per_device, *run.image_shape), jnp.float32)
  keys = jax.ShapeDtypeStruct((per_device, 2), jnp.uint32)
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), run.params)
  chunk_flops = float(
    bench._cost(
      jax.jit(lambda p, x, kd: one_chunk(p, x, jax.vmap(jax.random.wrap_key_data)(kd)))
      .lower(params, x, keys)
      .compile()
    ).get("flops", 0.0)
  )
  flops = chunk_flops * (-(-k // chunk)) * (-(-n // per_device))
  # The warm-up call compiles on one batch: the timed call is the pass alone.
  sizes = iter((evaluator.batch_size, n))
  seconds = timing.time_calls(
    lambda: evaluation.importance_values(run, evaluator, run.params, rng, next(sizes), k, None)
  ).window_s[0]
  peak = bench.matmul_peak()  # the host's: simulated devices share it
  ais_fn = diagnostics.ais_fn(
    run.graphdef, run.protocol, c.ais_steps, c.ais_chains, c.ais_leapfrog, c.ais_init
  )
  small = Evaluator(run.runner, images, ais_examples)
  ais_seconds = timing.time_calls(  # the warm-up call compiles
    lambda: small.per_example("ais", ais_fn, run.params, rng, ais_examples)
  ).window_s[0]
  return dict(
    case="eval",
    model=config.model.name,
    num_examples=n,
    num_importance_samples=k,
    seconds=round(seconds, 1),
    flop_limit_seconds=round(flops / peak, 1),
    ratio_to_limit=round(seconds / (flops / peak), 3),
    flops=flops,
    matmul_peak_flop_per_s=round(peak),
    ais_steps=c.ais_steps,
    ais_chains=c.ais_chains,
    ais_leapfrog=c.ais_leapfrog,
    ais_seconds_per_1000=round(ais_seconds * 1000 / ais_examples, 1),
    iwae_seconds_per_1000=round(seconds * 1000 / n, 1),
  )


def parse_flags(argv, define, doc):
  """FlagValues with --config (and its `--config.key=value` overrides, as flaxvae's), the flags
  `define` adds, and --help (prints `doc` and the flags)."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file(
    "config", None, "a config file (configs/*.py)", flag_values=fv, lock_config=True, sys_argv=argv
  )
  flags.DEFINE_boolean("help", False, "show this help", flag_values=fv, short_name="h")
  define(fv)
  fv(argv)
  if fv.help:
    print(doc.strip(), "\n", fv.get_help(), sep="\n")
    sys.exit(0)
  if fv.config is None:
    sys.exit(f"{os.path.basename(argv[0])} needs --config configs/NAME.py")
  return fv


def parse(argv):
  def define(fv):
    flags.DEFINE_integer("steps", 0, "train steps per timed window (0: about 2 s)", flag_values=fv)
    flags.DEFINE_integer(
      "windows", 5, "timed windows per case (the median is reported)", flag_values=fv
    )
    flags.DEFINE_list(
      "cases", ["default", "dispatch", "scaling"], f"of {', '.join(CASES)}", flag_values=fv
    )

  fv = parse_flags(argv, define, __doc__)
  unknown = set(fv.cases) - set(CASES)
  if unknown:
    sys.exit(f"unknown --cases {sorted(unknown)}: choose from {', '.join(CASES)}")
  return fv


def main(argv):
  fv = parse(argv)
  in_children = (
    (SCALING_CHILD, "scaling", 8, ()),
    (PROFILE_CHILD, "profile", 1, (op_profile.TRACE_THUNKS,)),
  )
  for marker, case, _, _ in in_children:
    if os.environ.get(marker) == "1":
      run_cases(fv.config, (case,), steps=fv.steps, windows=fv.windows)
      return
  here = tuple(c for c in fv.cases if c not in {case for _, case, _, _ in in_children})
  if here:
    run_cases(fv.config, here, steps=fv.steps, windows=fv.windows)
  # Simulated devices split the host's threads and traced thunks cost time: only the cases
  # that need them run with them, each in a child process.
  for marker, case, devices, xla_flags in in_children:
    if case in fv.cases:
      bench.in_child_with_devices(
        [os.path.abspath(__file__), *argv[1:]], devices, marker, xla_flags
      )


if __name__ == "__main__":
  main(sys.argv)
