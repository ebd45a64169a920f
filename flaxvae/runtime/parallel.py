"""Runs a per-device function over all devices with `jax.shard_map` (default) or `jax.pmap`.

The step functions in `train/step.py` are written once, per device, with collectives
over the `data` axis. A `Runner` owns the device layout of one backend: it
places replicated values and batch-sharded arrays, wraps per-device functions,
and turns device values back into one host-side copy. Both backends take the
same host arrays and give the same results, so callers never branch on them.
"""

import dataclasses
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from flaxvae.errors import ConfigError
from flaxvae.runtime import dispatch

AXIS = "data"  # the data-parallel axis: the batch is split over it
FSDP = "fsdp"  # the parameter axis: parameters and optimizer state are split over it too
REPLICATED = "replicated"
BACKENDS = ("shard_map", "pmap")
FSDP_MIN_SIZE = 2**14  # arrays smaller than this stay whole on every device


def batch_axis(axis: int):
  """The layout of an array split over devices along `axis` (the global batch axis)."""
  return ("batch", axis)


def parse_mesh(spec, num_devices):
  """ "data:2,fsdp:4" -> (data, fsdp) sizes for `num_devices`; "" puts every device on data."""
  if not spec:
    return num_devices, 1
  sizes = {}
  for part in str(spec).split(","):
    name, _, size = part.partition(":")
    if name not in (AXIS, FSDP) or not size.isdigit() or int(size) <= 0 or name in sizes:
      raise ConfigError(f"parallel.mesh {spec!r}: give data:N and/or fsdp:M, e.g. 'data:2,fsdp:4'")
    sizes[name] = int(size)
  data, fsdp = sizes.get(AXIS, 0), sizes.get(FSDP, 1)
  data = data or num_devices // fsdp
  if data * fsdp != num_devices:
    raise ConfigError(
      f"parallel.mesh {spec!r} has {data * fsdp} devices but {num_devices} are "
      "used: make data x fsdp equal the device count (parallel.num_devices)"
    )
  return data, fsdp


def full_rank(spec, ndim):
  """`spec` padded with None (unsplit) to `ndim` entries."""
  return P(*spec, *([None] * (ndim - len(spec))))


def fsdp_dim(shape, fsdp):
  """The dimension an array of `shape` is split along over the fsdp axis, or None.

  ZeRO-3 / FSDP: the largest dimension divisible by the axis size; arrays smaller than
  FSDP_MIN_SIZE elements (biases, scalars, counters) stay whole on every device.
  """
  if fsdp <= 1 or int(np.prod(shape)) < FSDP_MIN_SIZE:
    return None
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      return dim
  return None


@dataclasses.dataclass
class Runner:
  backend: str
  devices: Sequence[jax.Device]
  # A wait on device results longer than this is a stuck run. None (no limit) on one device
  # in one process: nothing there waits on a peer, and an AIS pass may run for many minutes.
  wait_timeout_s: float | None = 600.0
  fsdp: int = 1  # devices each parameter is split over (1: replicated)

  def __post_init__(self):
    if self.backend not in BACKENDS:
      raise ConfigError(f"unknown parallel.backend {self.backend!r}: use shard_map or pmap")
    if len(self.devices) == 1 and jax.process_count() == 1:
      self.wait_timeout_s = None
    if self.fsdp > 1 and self.backend == "pmap":
      raise ConfigError(
        "the pmap backend is pure data parallelism: it cannot split parameters "
        "over an fsdp axis; use parallel.backend=shard_map with parallel.mesh"
      )
    # shard_map: explicit axes, so every array placed here carries its sharding in its type
    # and a layout the step did not ask for is an error at trace time, not a silent copy.
    # pmap maps a leading device axis of its own: its mesh only places the stacked copies.
    if self.fsdp > 1:
      shape, self.batch_axes = (self.num_devices // self.fsdp, self.fsdp), (AXIS, FSDP)
    else:
      shape, self.batch_axes = (self.num_devices,), AXIS
    names = (AXIS, FSDP)[: len(shape)]
    kind = AxisType.Explicit if self.backend == "shard_map" else AxisType.Auto
    self.mesh = jax.make_mesh(
      shape, names, axis_types=(kind,) * len(shape), devices=list(self.devices)
    )

  @property
  def num_devices(self):
    return len(self.devices)

  @property
  def num_local_devices(self):
    return sum(d.process_index == jax.process_index() for d in self.devices)

  # -- layouts ----------------------------------------------------------------
  def _spec(self, kind, ndim):
    """The PartitionSpec of `kind` for an array of rank `ndim`, one entry per dimension.

    Full rank matters on an explicit mesh: jit gives its outputs full-rank specs, and an
    input placed as P() where the output came back as P(None, None) compiles the step again.
    """
    if kind == REPLICATED:
      return full_rank(P(), ndim)
    if isinstance(kind, P):
      return full_rank(kind, ndim)
    return full_rank(P(*([None] * kind[1]), self.batch_axes), ndim)

  def state_specs(self, tree):
    """PartitionSpecs of a state tree: each array split over fsdp along `fsdp_dim`."""

    def spec(x):
      dim = fsdp_dim(np.shape(x), self.fsdp)
      return full_rank(P() if dim is None else P(*([None] * dim), FSDP), np.ndim(x))

    return jax.tree.map(spec, tree)

  def sharding(self, kind=REPLICATED, ndim=0):
    """The NamedSharding of `kind` on this runner's mesh (for restoring checkpoints)."""
    return NamedSharding(self.mesh, self._spec(kind, ndim))

  def state_shardings(self, tree):
    return jax.tree.map(lambda s: NamedSharding(self.mesh, s), self.state_specs(tree))

  # -- placement ------------------------------------------------------------
  def put(self, tree, kind=REPLICATED):
    """Host values (the same on every process) -> device values in this runner's layout.

    For a batch-sharded kind, each process passes its own slice of the global batch; kind
    "state" lays each array out as `state_specs` says.
    """
    if self.backend == "pmap":
      # pmap maps a leading device axis: stack one slice (or copy) per local device.
      n = self.num_local_devices

      def stack(x):
        x = np.asarray(x)
        parts = [x] * n if kind in (REPLICATED, "state") else np.split(x, n, axis=kind[1])
        stacked = NamedSharding(self.mesh, full_rank(P(AXIS), x.ndim + 1))
        return jax.make_array_from_process_local_data(stacked, np.stack(parts))

      return jax.tree.map(stack, tree)
    if kind == "state":
      return jax.tree.map(self._place_whole, tree, self.state_shardings(tree))

    def place(x):
      x = np.asarray(x) if not isinstance(x, jax.Array) else x
      sharding = NamedSharding(self.mesh, self._spec(kind, x.ndim))
      if kind == REPLICATED:
        return self._place_whole(x, sharding)
      return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree.map(place, tree)

  @staticmethod
  def _place_whole(x, sharding):
    """A value every process holds whole -> a global array laid out as `sharding`.

    An array already on this mesh (a replicated one being split over fsdp) moves with
    `jax.sharding.reshard`, device to device; anything else goes through the host.
    """
    if isinstance(x, jax.Array):
      if x.sharding == sharding:
        return x
      if isinstance(x.sharding, NamedSharding) and x.sharding.mesh == sharding.mesh:
        return jax.sharding.reshard(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

  def get(self, tree):
    """Device values (replicated or split over fsdp) -> one whole host copy (numpy)."""
    dispatch.wait(tree, self.wait_timeout_s)
    if self.backend == "pmap":
      return jax.tree.map(lambda x: np.asarray(x[0]), tree)

    def whole(x):
      if x.sharding.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      if x.is_fully_addressable:
        return np.asarray(x)
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(whole, tree)

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

  # -- wrapping -------------------------------------------------------------
  def wrap(self, fn: Callable, in_kinds, out_kinds, donate_argnums=()):
    """Compiles the per-device `fn` for all devices.

    in_kinds/out_kinds give each argument's/output's layout: REPLICATED or
    batch_axis(i). Donated arguments are reused for the outputs (the state).
    """
    if self.backend == "pmap":
      # pmap maps the leading (device) axis; batch-sharded arrays were split by `put`.
      return jax.pmap(fn, axis_name=AXIS, devices=self.devices, donate_argnums=donate_argnums)

    def spec_of(kind):
      if kind == REPLICATED or isinstance(kind, P):
        return self._spec(kind, 0)
      if isinstance(kind, tuple) and len(kind) == 2 and kind[0] == "batch":
        return self._spec(kind, kind[1] + 1)
      return kind  # a pytree of PartitionSpecs (a state laid out by state_specs)

    def spec_tree(kinds):
      return tuple(spec_of(k) for k in kinds)

    in_specs, out_specs = spec_tree(in_kinds), spec_tree(out_kinds)
    if len(out_kinds) == 1:
      out_specs = out_specs[0]
    mapped = jax.shard_map(
      fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
    )
    return jax.jit(mapped, donate_argnums=donate_argnums)


def create_runner(settings, batch_size):
  """The training runner for `settings` (settings.ParallelSettings), after checking the batch
  splits over devices and the mesh (`parallel.mesh`, e.g. "data:2,fsdp:4") covers them."""
  devices = jax.devices()
  wanted = settings.num_devices or len(devices)
  if wanted > len(devices):
    raise ConfigError(
      f"parallel.num_devices={wanted} but JAX sees only {len(devices)} devices: "
      "lower it or set 0 for all"
    )
  if batch_size <= 0:
    raise ConfigError(f"batch_size must be positive, got {batch_size}")
  if batch_size % wanted:
    raise ConfigError(
      f"batch_size {batch_size} does not divide evenly over {wanted} devices: "
      f"use a multiple of {wanted} (e.g. {(batch_size // wanted + 1) * wanted}) "
      "or set parallel.num_devices"
    )
  if settings.backend == "pmap" and jax.process_count() > 1 and wanted != len(devices):
    raise ConfigError("parallel.num_devices must be 0 with the pmap backend on several processes")
  _, fsdp = parse_mesh(settings.mesh, wanted)
  return Runner(settings.backend, devices[:wanted], settings.wait_timeout_s, fsdp)


def inference_runner(settings):
  """A runner for evaluation and inference on whatever devices this machine has (`settings`:
  settings.ParallelSettings).

  Unlike training, nothing has to divide the training batch (evaluation pads its batches),
  and a run pinned to more devices than are here still evaluates, on all of them.
  """
  devices = jax.devices()
  wanted = min(settings.num_devices or len(devices), len(devices))
  if settings.backend == "pmap" and jax.process_count() > 1:
    wanted = len(devices)
  return Runner(settings.backend, devices[:wanted], settings.wait_timeout_s)
