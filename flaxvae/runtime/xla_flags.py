"""XLA flags flaxvae sets before JAX starts a backend (they are read once, at start-up).

On XLA:CPU (jaxlib 0.10) convolutions go to YNNPACK by default, whose training
convolutions ran the conv VAE step at 0.64x PyTorch here; Eigen's run it at about
1.1x (BENCHMARKS.md). Dots stay with YNNPACK, which is faster for them. The flag
only touches the CPU backend. A flag the user already set in XLA_FLAGS wins, and
FLAXVAE_XLA_DEFAULTS=0 turns these defaults off.
"""
import importlib.metadata
import os
import sys

CPU_CONVOLUTIONS_TO_EIGEN = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
# XLA aborts on a flag it does not know, so defaults apply only to jaxlib versions that have them.
_KNOWN_JAXLIB = ("0.10.",)


def _jax_started():
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
    return xla_bridge.backends_are_initialized()
  except Exception:  # an API change: assume it may have started
    return True


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
  """Sets flaxvae's XLA defaults, if JAX has not started a backend yet."""
  environ = os.environ if environ is None else environ
  if environ.get("FLAXVAE_XLA_DEFAULTS", "1") == "0" or _jax_started():
    return
  try:
    jaxlib_version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return
  if jaxlib_version.startswith(_KNOWN_JAXLIB):
    add(CPU_CONVOLUTIONS_TO_EIGEN, environ)
