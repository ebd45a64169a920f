"""Every choice that depends on the backend JAX runs on, in one place (models and the
evaluation ask here instead of carrying their own tuning).

XLA:CPU runs convolutions inside a rolled loop (lax.scan, while) many times slower than
unrolled (docs/performance.md): inside a loop it keeps the loop's layouts and cannot call its
convolution library. So on CPU a convolutional model's stacked layers are unrolled, and its
evaluation dispatches chunks of importance samples from the host instead of scanning over them
on the device.
"""

import jax
import jax.numpy as jnp

# Decoder rows per device in one host-dispatched chunk of importance samples, per registered
# model name, for the convolutional models whose evaluation on XLA:CPU is chunked from the host.
# Models not named here scan over their samples on the device on every backend.
HOST_CHUNK_ROWS_ON_CPU = {"conv": 1024, "vdvae": 256}


def on_cpu():
  return jax.default_backend() == "cpu"


def host_chunk_rows(model_name):
  """Decoder rows per device per host-dispatched chunk of importance samples for `model_name`
  on this backend, or None when its samples are scanned on the device."""
  return HOST_CHUNK_ROWS_ON_CPU.get(model_name) if on_cpu() else None


def scan_blocks_default():
  """How a model's stacked layers run when its config says `auto`: `scan` compiles once per
  group (accelerators), `unroll` keeps XLA:CPU's fast convolutions."""
  return "unroll" if on_cpu() else "scan"


def separate_waiting_program():
  """Whether a run whose discriminator starts later also compiles a program without the
  discriminator's branches, which the host dispatches before its start (train/step.py): on
  XLA:CPU, where `branch` below computes the skipped branch and discards it; accelerators skip
  it with lax.cond inside the one program."""
  return on_cpu()


def branch(predicate, when_true, when_false):
  """`lax.cond(predicate, when_true, when_false, None)`, except on XLA:CPU, where both branches
  run and the result is selected: XLA:CPU runs the convolutions inside a conditional's branches
  on its slow path, as inside a rolled loop, so a skipped branch that holds convolutions (the
  discriminator's, before its start) costs more where it runs than computing it every step
  (docs/performance.md). The branches take no operand and must not depend on which one runs.
  A Python bool `predicate` (known when tracing) runs its branch alone on every backend."""
  if isinstance(predicate, bool):
    return (when_true if predicate else when_false)(None)
  if not on_cpu():
    return jax.lax.cond(predicate, when_true, when_false, None)
  taken, skipped = when_true(None), when_false(None)
  return jax.tree.map(lambda a, b: jnp.where(predicate, a, b), taken, skipped)
