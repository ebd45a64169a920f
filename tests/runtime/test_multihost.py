"""Several processes on localhost (jax.distributed over gloo) against one process.

The launch scripts' own commands are checked in test_launch_scripts.py."""

import json
import os
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from flaxvae import settings
from flaxvae.train import checkpoint as checkpoint_lib
from flaxvae.train import trainer
from tests.conftest import FLAXVAE, REPO, load_config, set_keys

TINY_RUN = [
  "--config",
  str(REPO / "configs" / "fashion_mnist_mlp.py"),
  "--config.data.name=tiny",
  "--config.model.hidden=(16,)",
  "--config.model.latent_dim=4",
  "--config.batch_size=16",
  "--config.num_steps=24",
  "--config.steps_per_dispatch=4",
  "--config.log_every_steps=4",
  "--config.checkpoint.every_steps=8",
  "--config.eval.every_steps=0",
  "--config.eval.batch_size=16",
  "--config.eval.final_num_importance_samples=4",
  "--config.eval.amortization_examples=0",
  "--config.data.protocol=binarized",
]


@pytest.fixture(scope="module")
def data_dir(tiny_data_dir):
  return tiny_data_dir


def local_env(devices, data_dir):
  env = dict(
    os.environ,
    DEVICES_PER_PROCESS=str(devices),
    FLAXVAE_DATA_DIR=str(data_dir),
    FLAXVAE=str(FLAXVAE),
    FLAXVAE_HEARTBEAT_TIMEOUT="10",
  )
  env.pop("XLA_FLAGS", None)
  return env


def launch(num_processes, devices, workdir, data_dir, *extra, timeout=300):
  return subprocess.run(
    [
      str(REPO / "launch" / "local.sh"),
      str(num_processes),
      *TINY_RUN,
      f"--workdir={workdir}",
      *extra,
    ],
    env=local_env(devices, data_dir),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def start_two_until_checkpoint(workdir, data_dir):
  """Two processes of an endless run, once step 8 is saved: (launcher, [pid0, pid1])."""
  launcher = subprocess.Popen(
    [
      str(REPO / "launch" / "local.sh"),
      "2",
      *TINY_RUN,
      "--config.num_steps=100000",
      f"--workdir={workdir}",
    ],
    env=local_env(2, data_dir),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    deadline = time.monotonic() + 240
    while not (workdir / "checkpoints" / "8").is_dir():
      assert launcher.poll() is None and time.monotonic() < deadline, "no checkpoint was written"
      time.sleep(0.2)
    children = subprocess.run(
      ["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True
    ).stdout.split()
    assert len(children) == 2
  except BaseException:
    launcher.kill()
    raise
  return launcher, [int(c) for c in children]


def train_losses(workdir):
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  return [r["loss"] for r in rows if r["split"] == "train"]


def final_params(workdir):
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  path = workdir / "checkpoints" / str(steps[-1]) / "state"
  return checkpoint_lib.read_state(path)["params"]


@pytest.mark.slow
def test_two_processes_match_one_and_their_checkpoint_restores_on_one(tmp_path, data_dir):
  two, one = tmp_path / "two", tmp_path / "one"
  result = launch(2, 2, two, data_dir, "--config.num_steps=16")
  assert result.returncode == 0, result.stderr[-3000:]
  result = launch(1, 4, one, data_dir, "--config.num_steps=16")
  assert result.returncode == 0, result.stderr[-3000:]
  np.testing.assert_allclose(train_losses(two), train_losses(one), rtol=1e-5)
  import jax

  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
    final_params(two),
    final_params(one),
  )
  # The 2-process checkpoint continues in one process, and ends where the 1-process run ends.
  result = launch(1, 4, two, data_dir, "--config.checkpoint.allow_config_change=True")
  assert result.returncode == 0, result.stderr[-3000:]
  result = launch(1, 4, one, data_dir, "--config.checkpoint.allow_config_change=True")
  assert result.returncode == 0, result.stderr[-3000:]
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
    final_params(two),
    final_params(one),
  )


@pytest.mark.slow  # multi-process, like the others here
def test_two_processes_at_the_default_log_interval_with_one_step_dispatches(tmp_path, data_dir):
  """Nothing read back until the end: the queued multi-process dispatches must not deadlock."""
  result = launch(
    2,
    2,
    tmp_path / "run",
    data_dir,
    "--config.num_steps=40",
    "--config.steps_per_dispatch=1",
    "--config.log_every_steps=1000",
    "--config.checkpoint.every_steps=0",
    timeout=240,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert train_losses(tmp_path / "run") and (tmp_path / "run" / "checkpoints" / "40").is_dir()


@pytest.mark.slow
def test_a_dead_process_stops_the_other_and_a_relaunch_resumes(tmp_path, data_dir):
  workdir = tmp_path / "run"
  launcher, children = start_two_until_checkpoint(workdir, data_dir)
  try:
    os.kill(children[1], signal.SIGKILL)  # process 1 dies without a chance to clean up
    killed_at = time.monotonic()
    status = launcher.wait(timeout=120)
    assert status != 0
    assert time.monotonic() - killed_at < 120
  finally:
    if launcher.poll() is None:
      launcher.kill()
  result = launch(
    1, 4, workdir, data_dir, "--config.checkpoint.allow_config_change=True", "--config.num_steps=24"
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "resumed from step" in result.stderr


@pytest.mark.slow
def test_sigterm_to_one_process_stops_all_at_one_committed_step(tmp_path, data_dir):
  """JAX's preemption sync: every process stops after the same dispatch, saved and committed."""
  workdir = tmp_path / "run"
  launcher, children = start_two_until_checkpoint(workdir, data_dir)
  try:
    os.kill(children[1], signal.SIGTERM)  # only process 1 is told
    assert launcher.wait(timeout=120) == 143
  finally:
    if launcher.poll() is None:
      launcher.kill()
  stops = re.findall(
    r"stopped at step (\d+) on SIGTERM: checkpoint committed", launcher.stderr.read()
  )
  assert len(stops) == 2 and stops[0] == stops[1], stops
  stopped = int(stops[0])
  steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  # A dispatch boundary: a multiple of steps_per_dispatch, or a step the config's log-spaced
  # schedule evaluates (23 of the endless run's 100,000 steps, reached when the machine is slow
  # to deliver the signal).
  endless = settings.resolve(set_keys(load_config("fashion_mnist_mlp"), num_steps=100000))
  assert max(steps) == stopped
  assert stopped % 4 == 0 or stopped in trainer.scheduled_evaluations(
    endless.eval, endless.num_steps
  ), stopped
  result = launch(
    2,
    2,
    workdir,
    data_dir,
    "--config.checkpoint.allow_config_change=True",
    f"--config.num_steps={stopped + 4}",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"resumed from step {stopped}" in result.stderr


def test_partial_multiprocess_flags_are_refused():
  from flaxvae.errors import ConfigError
  from flaxvae.runtime import distributed

  with pytest.raises(ConfigError, match="need all of"):
    distributed.explicit_settings("127.0.0.1:1234", None, None)
  with pytest.raises(ConfigError, match="must be in"):
    distributed.explicit_settings("127.0.0.1:1234", 2, 5)


@pytest.mark.slow
def test_fsdp_over_two_processes_continues_a_one_process_fsdp_checkpoint(tmp_path, data_dir):
  """Parameters split over fsdp across processes: 2 processes x 4 devices (data:2,fsdp:4)
  restore a checkpoint written by 1 process x 8 devices bitwise, and train on as 1 x 8 would
  (to float tolerance: gloo sums across processes in another order than one process does)."""
  fsdp = ["--config.parallel.mesh=data:2,fsdp:4", "--config.model.hidden=(64,)"]
  one, two, frozen = tmp_path / "one", tmp_path / "two", tmp_path / "frozen"
  result = launch(1, 8, one, data_dir, *fsdp, "--config.num_steps=8")
  assert result.returncode == 0, result.stderr[-3000:]
  shutil.copytree(one, two)
  shutil.copytree(one, frozen)
  written = final_params(one)
  # Restored on 2 processes x 4 devices and saved again with every step skipped (a gradient
  # norm ceiling no step meets): the parameters round-trip through the split layout bitwise.
  result = launch(
    2,
    4,
    frozen,
    data_dir,
    *fsdp,
    "--config.num_steps=12",
    "--config.optimizer.skip_threshold=1e-30",
    "--config.max_consecutive_skips=0",
    "--config.checkpoint.allow_config_change=True",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert (frozen / "checkpoints" / "12").is_dir()
  import jax

  jax.tree.map(np.testing.assert_array_equal, final_params(frozen), written)
  for workdir, processes, devices in ((two, 2, 4), (one, 1, 8)):
    result = launch(
      processes,
      devices,
      workdir,
      data_dir,
      *fsdp,
      "--config.num_steps=16",
      "--config.checkpoint.allow_config_change=True",
    )
    assert result.returncode == 0, result.stderr[-3000:]
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
    final_params(two),
    final_params(one),
  )
