"""flaxvae: VAEs in JAX/Flax NNX with posterior diagnostics.

`flaxvae.load(workdir)` and `flaxvae.load_dataset(config_or_workdir, split)` load lazily, so
`import flaxvae` (and the CLI) does not import JAX before the CLI has set XLA_FLAGS. Importing
flaxvae sets its XLA defaults (runtime/xla_flags.py) when JAX has not started yet.

Layout (each folder's __init__ says more):
  models/      the model contract and one file per model, chosen by name
  objectives/  pure math: Gaussians, likelihoods, ELBO/IWAE bounds, AIS/BDMC/k-hat estimators
  data/        datasets on disk, protocols, example order, input feeds
  train/       the train step, optimizer, guards, checkpoints, preemption, outputs, the trainer
  eval/        per-example evaluation over devices, diagnostics, sampling, report plots
  runtime/     devices and processes: placement, dispatch, multi-host, process defaults
  config.py, defaults.py, errors.py, registry.py, run.py (a run's assembled pieces),
  api.py (load, evaluate), bench.py, cli.py
"""
from flaxvae.runtime import xla_flags as _xla_flags

_xla_flags.apply_defaults()

__all__ = ["load", "load_dataset"]


def __getattr__(name):
  if name in __all__:
    import flaxvae.api  # noqa: PLC0415  (lazy on purpose: JAX must not start at `import flaxvae`)
    return getattr(flaxvae.api, name)
  raise AttributeError(f"module 'flaxvae' has no attribute {name!r}")
