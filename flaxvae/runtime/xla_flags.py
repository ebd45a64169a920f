"""XLA flags flaxvae sets before JAX starts a backend (they are read once, at start-up).

On XLA:CPU (jaxlib 0.10) convolutions go to YNNPACK by default, whose training convolutions
run the conv VAE step well below PyTorch's; Eigen's run it faster (BENCHMARKS.md). Dots stay
with YNNPACK, which is faster for them. The flag only touches the CPU backend. The `flaxvae`
command applies these defaults; a library user calls `flaxvae.apply_process_defaults()` before
importing JAX. A flag the user already set in XLA_FLAGS wins, and FLAXVAE_XLA_DEFAULTS=0 turns
these defaults off.
"""

import importlib.metadata
import os

from flaxvae.runtime import jax_private

CPU_CONVOLUTIONS_TO_EIGEN = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
# XLA aborts on a flag it does not know, so defaults apply only to jaxlib versions that have them.
_KNOWN_JAXLIB = ("0.10.",)


def add(flag, environ=None, variable="XLA_FLAGS", separator=" "):
  """Appends `name=value` to the `separator`-joined list in `variable` unless `name` is already
  set there (the user's value wins); True if added. malloc.py uses it for GLIBC_TUNABLES."""
  environ = os.environ if environ is None else environ
  current = environ.get(variable, "")
  name = flag.split("=", 1)[0]
  entries = current.split() if separator == " " else current.split(separator)
  if any(f.split("=", 1)[0] == name for f in entries):
    return False
  environ[variable] = f"{current}{separator}{flag}".strip(separator)
  return True


def apply_defaults(environ=None):
  """Sets flaxvae's XLA defaults in `environ` (os.environ) if JAX has not started a backend;
  False when it has (the flags would no longer be read) or they are turned off."""
  environ = os.environ if environ is None else environ
  if environ.get("FLAXVAE_XLA_DEFAULTS", "1") == "0" or jax_private.backends_started():
    return False
  try:
    jaxlib_version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return False
  if jaxlib_version.startswith(_KNOWN_JAXLIB):
    add(CPU_CONVOLUTIONS_TO_EIGEN, environ)
  return True
