"""Multi-process start-up through JAX's own runtime (`jax.distributed`), not a home-made one.

`flaxvae train` calls `initialize()` before anything touches a device:
- with explicit `--coordinator_address/--num_processes/--process_id` (or the
  FLAXVAE_COORDINATOR_ADDRESS / FLAXVAE_NUM_PROCESSES / FLAXVAE_PROCESS_ID variables,
  which launch/local.sh sets), it starts those processes' runtime;
- under a cluster JAX detects by itself (Cloud TPU, SLURM, Open MPI, Kubernetes), it
  calls `jax.distributed.initialize()` with no arguments and lets JAX find the peers;
- otherwise (one process) it does nothing.
On CPU the collectives run over gloo. A process that dies stops the others: JAX's
coordination service aborts the survivors once the dead one misses its heartbeats,
so `heartbeat_timeout_seconds` bounds how long they can hang in a collective.
"""

import logging
import os

import jax

from flaxvae.errors import ConfigError

log = logging.getLogger("flaxvae")

HEARTBEAT_TIMEOUT_S = int(os.environ.get("FLAXVAE_HEARTBEAT_TIMEOUT", "30"))
# Environment variables that mean "JAX can find the cluster by itself".
CLUSTER_MARKERS = (
  "SLURM_JOB_ID",
  "OMPI_COMM_WORLD_SIZE",
  "TPU_WORKER_HOSTNAMES",
  "JOBSET_NAME",
  "MEGASCALE_COORDINATOR_ADDRESS",
)


def explicit_settings(coordinator_address=None, num_processes=None, process_id=None):
  """The flags, else the FLAXVAE_* environment; None when no multi-process run is asked for."""
  env = os.environ
  address = coordinator_address or env.get("FLAXVAE_COORDINATOR_ADDRESS")
  count = num_processes if num_processes is not None else env.get("FLAXVAE_NUM_PROCESSES")
  index = process_id if process_id is not None else env.get("FLAXVAE_PROCESS_ID")
  given = [v is not None and v != "" for v in (address, count, index)]
  if not any(given):
    return None
  if not all(given):
    raise ConfigError(
      "multi-process runs need all of --coordinator_address, --num_processes "
      "and --process_id (or FLAXVAE_COORDINATOR_ADDRESS/_NUM_PROCESSES/_PROCESS_ID)"
    )
  count, index = int(count), int(index)
  if not 0 <= index < count:
    raise ConfigError(f"--process_id {index} must be in [0, {count}) for --num_processes {count}")
  return address, count, index


def initialize(coordinator_address=None, num_processes=None, process_id=None):
  """Starts the multi-process runtime when asked for or detected; returns (index, count)."""
  settings = explicit_settings(coordinator_address, num_processes, process_id)
  if settings is None and not any(k in os.environ for k in CLUSTER_MARKERS):
    return 0, 1
  # Only the CPU client reads this; asking for a backend here would start JAX too early.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if settings is None:
    jax.distributed.initialize(heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)
  else:
    address, count, index = settings
    jax.distributed.initialize(
      coordinator_address=address,
      num_processes=count,
      process_id=index,
      heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
    )
  log.info(
    "process %d of %d: %d local / %d global devices (%s)",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.devices()[0].device_kind,
  )
  return jax.process_index(), jax.process_count()
