"""The private JAX APIs flaxvae relies on, each behind one function, where JAX has no public
way to ask.

tests/runtime/test_process_defaults.py::test_the_private_jax_calls_still_answer_what_they_must
checks each against what it must answer, so a JAX release that moves one fails a test instead of
silently turning a guard off.
"""

import sys


def backends_started():
  """Whether JAX has started a backend (XLA_FLAGS are read once, then): False before `import
  jax`, and after it until the first computation or device query."""
  if "jax" not in sys.modules:
    return False
  from jax._src import xla_bridge  # noqa: PLC0415  (no public equivalent)

  return xla_bridge.backends_are_initialized()


def compilations(fn):
  """How many programs `fn`, a jax.jit function, has compiled and cached; None for a function
  jax.jit did not make (jax.pmap's keep no count)."""
  import jax  # noqa: PLC0415

  fn = getattr(fn, "jitted", fn)  # train/step.py WithConstants: the jitted function it binds
  if not isinstance(fn, type(jax.jit(_identity))):
    return None
  return fn._cache_size()


def _identity(x):
  return x
