"""flaxvae: VAEs in JAX/Flax NNX with posterior diagnostics.

`flaxvae.load(workdir)`, `flaxvae.load_dataset(config_or_workdir, split)` and
`flaxvae.import_weights` / `export_weights` (published KL autoencoders) load lazily, so
`import flaxvae` starts no JAX backend and changes nothing in the process (no environment
variable, no re-execution). The `flaxvae` command applies flaxvae's process defaults itself;
a program of your own calls `flaxvae.apply_process_defaults()` before importing JAX.

Layout (each folder's __init__ says more):
  models/      the model contract and one file per model, chosen by name
  objectives/  pure math: Gaussians, likelihoods, ELBO/IWAE bounds, AIS/BDMC/k-hat estimators
  data/        datasets on disk, protocols, example order, input feeds
  train/       the train step, optimizer, guards, checkpoints, preemption, outputs, the trainer
  eval/        per-example evaluation over devices, diagnostics, sampling, report plots
  runtime/     devices and processes: placement, dispatch, multi-host, process defaults,
               backend-dependent choices, the timing loop
  config.py, defaults.py, errors.py, registry.py, run.py (a run's assembled pieces),
  api.py (load, evaluate), bench.py (throughput and ahead-of-time memory), cli.py
"""

__all__ = ["load", "load_dataset", "import_weights", "export_weights", "apply_process_defaults"]


def apply_process_defaults(*, malloc=False):
  """Sets the process defaults the `flaxvae` command runs with; call it before importing JAX.

  XLA flags (runtime/xla_flags.py: XLA:CPU's convolutions in Eigen) go into os.environ, where
  JAX reads them when it starts a backend; a flag already in XLA_FLAGS keeps your value.
  `malloc=True` also gives glibc malloc the tunables of runtime/malloc.py, which glibc reads
  only at start-up: the program re-executes itself once with them (same PID, same command
  line). Returns False when JAX had already started a backend, so the XLA flags came too late.
  """
  from flaxvae.runtime import malloc as malloc_lib  # noqa: PLC0415  (nothing at import time)
  from flaxvae.runtime import xla_flags  # noqa: PLC0415

  if malloc:
    malloc_lib.reexec_with_tuned_malloc()
  return xla_flags.apply_defaults()


def __getattr__(name):
  if name in ("load", "load_dataset", "import_weights", "export_weights"):
    import flaxvae.api  # noqa: PLC0415  (lazy on purpose: JAX must not start at `import flaxvae`)

    return getattr(flaxvae.api, name)
  raise AttributeError(f"module 'flaxvae' has no attribute {name!r}")
