"""Waiting on the devices: bounded dispatches, waits that time out with one clear line, and
signal handlers that run while the host waits (the trainer's preemption depends on it)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxvae.errors import DeviceTimeout
from flaxvae.runtime import dispatch, parallel
from tests.conftest import REPO


def slow(seconds):
  """An array computed by a host callback that sleeps: device work of a known duration.

  On several devices: XLA:CPU runs a one-device program with a host callback inline in the
  dispatching thread, but dispatches multi-device programs asynchronously, as the trainer's.
  """

  def sleep(x):
    time.sleep(seconds)
    return x

  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("d",))
  fn = jax.shard_map(
    lambda x: jax.lax.psum(
      jax.pure_callback(sleep, jax.ShapeDtypeStruct(x.shape, x.dtype), x), "d"
    ),
    mesh=mesh,
    in_specs=jax.P("d"),
    out_specs=jax.P(),
  )
  return jax.jit(fn)(jnp.ones((jax.device_count(),), jnp.float32))


def test_wait_returns_the_computed_tree():
  tree = {"a": jnp.arange(3) * 2, "b": slow(0.05)}
  assert dispatch.wait(tree, timeout_s=30) is tree
  np.testing.assert_array_equal(tree["a"], [0, 2, 4])


def test_a_wait_that_outlasts_its_timeout_is_one_clear_line():
  x = slow(3.0)
  start = time.monotonic()
  with pytest.raises(DeviceTimeout, match=r"did not finish within 1 s.*stuck.*wait_timeout_s"):
    dispatch.wait(x, timeout_s=1.0, what="a test dispatch")
  assert time.monotonic() - start < 2.5
  jax.block_until_ready(x)


def test_signal_handlers_run_while_the_host_waits():
  seen = []
  previous = signal.signal(signal.SIGALRM, lambda *_: seen.append(time.monotonic()))
  try:
    x = slow(2.0)
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    start = time.monotonic()
    dispatch.wait(x, timeout_s=30)
    done = time.monotonic()
  finally:
    signal.signal(signal.SIGALRM, previous)
  assert seen and seen[0] - start < 1.0 < done - start  # the handler ran mid-wait


def test_in_flight_keeps_at_most_two_dispatches_queued():
  window = dispatch.InFlight(timeout_s=30, limit=2)
  outputs = [slow(0.2) for _ in range(1)]
  window.add(outputs[0])
  for _ in range(3):
    outputs.append(slow(0.2))
    window.add(outputs[-1])
    assert sum(not o.is_ready() for o in outputs) <= 2
  window.drain()
  assert all(o.is_ready() for o in outputs)


# A model whose step blocks in a host callback while FLAG exists: a stuck device, on purpose.
STUCK_DRIVER = textwrap.dedent("""
  import os, sys, time
  sys.path.insert(0, {repo!r})
  import jax, jax.numpy as jnp
  from flaxvae import cli
  from flaxvae.models import mlp
  from flaxvae.models.registry import MODELS

  def block(x):
    while os.path.exists({flag!r}):
      time.sleep(0.05)
    return x

  @MODELS.register("stuck_mlp")
  class StuckMLP(mlp.MLPVAE):
    def decode(self, z):
      held = jax.pure_callback(block, jax.ShapeDtypeStruct(z.shape, z.dtype),
                               jax.lax.stop_gradient(z))
      return super().decode(z + 0.0 * jax.lax.stop_gradient(held))

  sys.exit(cli.main(["flaxvae", "train", "--config", {config!r}, "--workdir", {workdir!r},
                     *sys.argv[1:]]))
""")


def start_stuck(tmp_path, tiny_data_dir, *args):
  flag = tmp_path / "stuck"
  config = tmp_path / "stuck_config.py"
  config.write_text(
    textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {str(REPO)!r})
      from flaxvae import defaults
      from tests.conftest import tiny_config
      def get_config():
        # Two devices: XLA:CPU dispatches a multi-device step asynchronously, as on a real run.
        c = tiny_config(num_steps=1000, steps_per_dispatch=1, log_every_steps=1)
        with c.unlocked():
          c.data.name, c.data.data_dir = "tiny", {str(tiny_data_dir)!r}
          c.model = defaults.model_config("mlp", hidden=(16,), latent_dim=2)
          c.model.name = "stuck_mlp"
        return c
  """)
  )
  code = STUCK_DRIVER.format(
    repo=str(REPO), flag=str(flag), config=str(config), workdir=str(tmp_path / "run")
  )
  proc = subprocess.Popen(
    [sys.executable, "-c", code, *args],
    cwd=REPO,
    text=True,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2"),
  )
  metrics = tmp_path / "run" / "metrics.jsonl"
  deadline = time.monotonic() + 120
  while not (metrics.exists() and metrics.read_text().strip()):
    assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
    time.sleep(0.1)
  flag.touch()  # from now on the next step blocks inside the device computation
  return proc


def test_a_stuck_device_ends_the_run_in_one_line_within_the_timeout(tmp_path, tiny_data_dir):
  proc = start_stuck(tmp_path, tiny_data_dir, "--config.parallel.wait_timeout_s=3")
  out, err = proc.communicate(timeout=90)
  assert proc.returncode == 1, err[-2000:]
  last = err.strip().splitlines()[-1]
  assert last.startswith("flaxvae train: error: ") and "did not finish within 3 s" in last, last


def test_a_second_signal_exits_at_once_while_the_host_waits_on_a_stuck_device(
  tmp_path, tiny_data_dir
):
  proc = start_stuck(tmp_path, tiny_data_dir, "--config.parallel.wait_timeout_s=600")
  time.sleep(1.0)
  proc.send_signal(signal.SIGTERM)
  time.sleep(0.5)
  start = time.monotonic()
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 137, err[-2000:]
  assert time.monotonic() - start < 10
  assert "second signal: exiting now" in err


def test_one_device_waits_without_a_limit_and_several_with_one():
  """A collective can only be stuck with peers: on one device in one process a long
  evaluation (AIS for minutes) is legitimate, so the wait has no limit."""
  assert parallel.Runner("shard_map", jax.devices()[:1], wait_timeout_s=5).wait_timeout_s is None
  assert parallel.Runner("shard_map", jax.devices()[:2], wait_timeout_s=5).wait_timeout_s == 5
