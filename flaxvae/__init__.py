"""flaxvae: VAEs in JAX/Flax NNX with posterior diagnostics.

`flaxvae.load(workdir)` and `flaxvae.load_dataset(config_or_workdir, split)` are
imported lazily, so `import flaxvae` (and the CLI) does not import JAX before
the CLI has set XLA_FLAGS. Importing flaxvae sets its XLA defaults
(`xla_flags.py`) when JAX has not started yet.
"""
from flaxvae import xla_flags as _xla_flags

_xla_flags.apply_defaults()

__all__ = ["load", "load_dataset"]


def __getattr__(name):
  if name in __all__:
    from flaxvae import api
    return getattr(api, name)
  raise AttributeError(f"module 'flaxvae' has no attribute {name!r}")
