"""Runs a per-device function over all devices with `jax.shard_map` (default) or `jax.pmap`.

The step functions in `train/step.py` are written once, per device, with collectives
over the `data` axis. A `Runner` owns the device layout of one backend: it
places replicated values and batch-sharded arrays, wraps per-device functions,
and turns device values back into one host-side copy. Both backends take the
same host arrays and give the same results, so callers never branch on them.
"""
import dataclasses
from typing import Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flaxvae.errors import ConfigError
from flaxvae.runtime import dispatch

AXIS = "data"  # the one named axis of the data-parallel mesh
REPLICATED = "replicated"
BACKENDS = ("shard_map", "pmap")


def batch_axis(axis: int):
  """The layout of an array split over devices along `axis` (the global batch axis)."""
  return ("batch", axis)


@dataclasses.dataclass
class Runner:
  backend: str
  devices: Sequence[jax.Device]
  wait_timeout_s: float = 600.0  # a wait on device results longer than this is a stuck run

  def __post_init__(self):
    if self.backend not in BACKENDS:
      raise ConfigError(f"unknown parallel.backend {self.backend!r}: use shard_map or pmap")
    self.mesh = Mesh(np.asarray(self.devices), (AXIS,))

  @property
  def num_devices(self):
    return len(self.devices)

  @property
  def num_local_devices(self):
    return sum(d.process_index == jax.process_index() for d in self.devices)

  # -- placement ------------------------------------------------------------
  def _spec(self, kind, ndim):
    if kind == REPLICATED:
      return P()
    axis = kind[1]
    return P(*([None] * axis), AXIS)

  def put(self, tree, kind=REPLICATED):
    """Host values (the same on every process) -> device values in this runner's layout.

    For a batch-sharded kind, each process passes its own slice of the global batch.
    """
    if self.backend == "pmap":
      # pmap maps a leading device axis: stack one slice (or copy) per local device.
      n = self.num_local_devices
      stacked = NamedSharding(self.mesh, P(AXIS))

      def stack(x):
        x = np.asarray(x)
        parts = [x] * n if kind == REPLICATED else np.split(x, n, axis=kind[1])
        return jax.make_array_from_process_local_data(stacked, np.stack(parts))
      return jax.tree.map(stack, tree)

    def place(x):
      x = np.asarray(x) if not isinstance(x, jax.Array) else x
      sharding = NamedSharding(self.mesh, self._spec(kind, x.ndim))
      if kind == REPLICATED:
        if isinstance(x, jax.Array) and x.sharding == sharding:
          return x
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
      return jax.make_array_from_process_local_data(sharding, np.asarray(x))
    return jax.tree.map(place, tree)

  def get(self, tree):
    """Replicated device values -> one host copy (numpy), whatever the backend."""
    dispatch.wait(tree, self.wait_timeout_s)
    if self.backend == "pmap":
      return jax.tree.map(lambda x: np.asarray(x[0]), tree)
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)

  def gather(self, tree):
    """Batch-sharded device values (axis 0) -> full host arrays, from every process."""
    dispatch.wait(tree, self.wait_timeout_s)
    def full(x):
      if jax.process_count() > 1:
        x = multihost_utils.process_allgather(x, tiled=self.backend == "shard_map")
      x = np.asarray(x)
      return x.reshape(-1, *x.shape[2:]) if self.backend == "pmap" else x
    return jax.tree.map(full, tree)

  def unreplicate(self, tree):
    """Replicated device values -> the global-array layout (checkpoints, evaluation)."""
    if self.backend == "pmap":
      return jax.tree.map(lambda x: x[0], tree)
    return tree

  def sharding(self, kind=REPLICATED, ndim=0):
    """The NamedSharding of `kind` on this runner's mesh (for restoring checkpoints)."""
    return NamedSharding(self.mesh, self._spec(kind, ndim))

  # -- wrapping -------------------------------------------------------------
  def wrap(self, fn: Callable, in_kinds, out_kinds, donate_argnums=()):
    """Compiles the per-device `fn` for all devices.

    in_kinds/out_kinds give each argument's/output's layout: REPLICATED or
    batch_axis(i). Donated arguments are reused for the outputs (the state).
    """
    if self.backend == "pmap":
      # pmap maps the leading (device) axis; batch-sharded arrays were split by `put`.
      return jax.pmap(fn, axis_name=AXIS, devices=self.devices, donate_argnums=donate_argnums)

    def spec_tree(kinds):
      return tuple(self._spec(k, 0) if k == REPLICATED else self._spec(k, k[1] + 1) for k in kinds)

    in_specs, out_specs = spec_tree(in_kinds), spec_tree(out_kinds)
    if len(out_kinds) == 1:
      out_specs = out_specs[0]
    mapped = jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                           check_vma=False)
    return jax.jit(mapped, donate_argnums=donate_argnums)


def create_runner(parallel_config, batch_size):
  """The training runner for `config.parallel`, after checking the batch splits over devices."""
  devices = jax.devices()
  wanted = parallel_config.num_devices or len(devices)
  if wanted > len(devices):
    raise ConfigError(f"parallel.num_devices={wanted} but JAX sees only {len(devices)} devices: "
                      "lower it or set 0 for all")
  if batch_size <= 0:
    raise ConfigError(f"batch_size must be positive, got {batch_size}")
  if batch_size % wanted:
    raise ConfigError(f"batch_size {batch_size} does not divide evenly over {wanted} devices: "
                      f"use a multiple of {wanted} (e.g. {(batch_size // wanted + 1) * wanted}) "
                      "or set parallel.num_devices")
  if parallel_config.backend == "pmap" and jax.process_count() > 1 and wanted != len(devices):
    raise ConfigError("parallel.num_devices must be 0 with the pmap backend on several processes")
  return Runner(parallel_config.backend, devices[:wanted], parallel_config.wait_timeout_s)


def inference_runner(parallel_config):
  """A runner for evaluation and inference on whatever devices this machine has.

  Unlike training, nothing has to divide the training batch (evaluation pads its batches),
  and a run pinned to more devices than are here still evaluates, on all of them.
  """
  devices = jax.devices()
  wanted = min(parallel_config.num_devices or len(devices), len(devices))
  if parallel_config.backend == "pmap" and jax.process_count() > 1:
    wanted = len(devices)
  return Runner(parallel_config.backend, devices[:wanted], parallel_config.wait_timeout_s)
