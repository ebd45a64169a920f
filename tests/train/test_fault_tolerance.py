"""Fault tolerance: exact resume, preemption, portability, gradient guards, storage failures.

One tiny run (8x8 images, 64 examples, 12 steps of batch 16) is trained once per module
as the reference; the other tests interrupt, corrupt or move copies of it.
"""

import contextlib
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from flaxvae import cli
from flaxvae import config as config_lib
from flaxvae import data as data_lib
from flaxvae.data import protocols
from flaxvae.errors import CheckpointError, ConfigError, Diverged
from flaxvae.objectives import bounds
from flaxvae.run import Run
from flaxvae.train import checkpoint as checkpoint_lib
from flaxvae.train import guards, preemption, workdir_lock
from flaxvae.train import step as step_lib
from flaxvae.train.trainer import train as train_run
from tests import conftest

REPO = conftest.REPO
DATASET = data_lib.ArrayDataset(
  {
    "train": conftest.random_images(64, 0, (8, 8, 1)),
    "test": conftest.random_images(16, 1, (8, 8, 1)),
  }
)
STOP_AT = 6  # mid-epoch: an epoch is 4 steps


def tiny_config(**changes):
  return conftest.tiny_config(
    **{
      "ema_decay": 0.9,
      "data.pipeline": "in_memory",
      "optimizer.adaptive_skip": 4.0,
      "optimizer.adaptive_skip_window": 8,
      **changes,
    }
  )


def train(config, workdir):
  return train_run(config, workdir, DATASET)


@pytest.fixture(scope="module", autouse=True)
def cache(compilation_cache):
  yield


def saved_state(workdir, step):
  """A checkpoint's state opened with orbax alone, as the checkpoint docstring shows."""
  return ocp.StandardCheckpointer().restore(
    pathlib.Path(workdir, "checkpoints", str(step), "state").absolute()
  )


def assert_bitwise(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def stop_at(step_to_stop):
  def should_stop(self, step):
    if step >= step_to_stop:
      self.signum = signal.SIGTERM
    return self.signum is not None

  return should_stop


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reference")
  train(tiny_config(), str(workdir))
  return workdir


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
  """Preempted (in process) at STOP_AT, then resumed to the end."""
  workdir = tmp_path_factory.mktemp("resumed")
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(preemption.Watcher, "should_stop", stop_at(STOP_AT))
    with pytest.raises(preemption.Preempted) as stopped:
      train(tiny_config(**{"checkpoint.every_steps": 100}), str(workdir))
  assert stopped.value.code == 143 and stopped.value.step == STOP_AT
  interrupted = saved_state(workdir, STOP_AT)
  train(tiny_config(**{"checkpoint.every_steps": 100}), str(workdir))
  return workdir, interrupted


def test_resume_mid_epoch_is_bitwise_equal(reference, resumed):
  workdir, interrupted = resumed
  assert int(interrupted["step"]) == STOP_AT
  final, expected = saved_state(workdir, 12), saved_state(reference, 12)
  assert_bitwise(final, expected)  # params, opt_state, EMA, rng, skip counters, norm window


def test_eight_devices_to_one_with_pmap_and_back(reference, resumed, tmp_path):
  workdir = tmp_path / "moved"
  shutil.copytree(resumed[0], workdir)
  shutil.rmtree(workdir / "checkpoints" / "12")  # keep only the step-6 checkpoint (8 devices)
  one = train(tiny_config(**{"parallel.backend": "pmap", "parallel.num_devices": 1}), str(workdir))
  expected = saved_state(reference, 12)
  got = saved_state(workdir, 12)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
    got["params"],
    expected["params"],
  )
  # ... and the pmap, 1-device step-12 checkpoint back on 8 devices with shard_map.
  (workdir / "eval.json").unlink()  # else the finished run's evaluation is reused
  eight = train(tiny_config(), str(workdir))
  np.testing.assert_allclose(eight["elbo"], one["elbo"], rtol=1e-4)


def test_rerunning_a_finished_run_reuses_its_final_evaluation(reference, tmp_path):
  workdir = tmp_path / "finished"
  shutil.copytree(reference, workdir)
  stored = json.loads((workdir / "eval.json").read_text())
  (workdir / "eval.json").write_text(json.dumps(dict(stored, marker="reused")))
  assert train(tiny_config(), str(workdir))["marker"] == "reused"  # not evaluated again
  # Another K is another evaluation.
  row = train(tiny_config(**{"eval.final_num_importance_samples": 3}), str(workdir))
  assert "marker" not in row and row["num_importance_samples"] == 3


DRIVER = """
import sys, time
sys.path.insert(0, {repo!r})
from flaxvae import cli
from flaxvae.data import feeds
if {slow}:  # fault injection: a slow input feed, so a signal lands mid-run
  args = feeds.InMemoryFeed.args
  feeds.InMemoryFeed.args = lambda self, n: (time.sleep(0.4 * {slow}), args(self, n))[1]
sys.exit(cli.main(["flaxvae", "train", "--config", {config!r}, "--workdir", {workdir!r}]))
"""


def start_trainer(tmp_path, workdir, slow, data_dir):
  """`flaxvae train` in a subprocess on the on-disk `tiny` dataset (the same in every call)."""
  config = tmp_path / "tiny_config.py"
  config.write_text(
    f"import sys\nsys.path.insert(0, {str(REPO)!r})\n"
    "from tests.train.test_fault_tolerance import tiny_config\n"
    "def get_config():\n"
    f"  return tiny_config(**{{'data.name': 'tiny', 'data.data_dir': {str(data_dir)!r}}})\n"
  )
  code = DRIVER.format(repo=str(REPO), slow=slow, config=str(config), workdir=str(workdir))
  return subprocess.Popen(
    [sys.executable, "-c", code],
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def wait_for_training(proc, workdir, timeout=90):
  """Returns once the first train metrics row is written (the loop is running)."""
  metrics = pathlib.Path(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline:
    if metrics.exists() and metrics.read_text().strip():
      return
    assert proc.poll() is None, proc.communicate()[0]
    time.sleep(0.05)
  proc.kill()
  pytest.fail("the trainer did not start")


def test_sigterm_saves_and_resume_matches(tmp_path, tiny_data_dir):
  workdir, reference = tmp_path / "run", tmp_path / "reference"
  proc = start_trainer(tmp_path, reference, slow=False, data_dir=tiny_data_dir)
  output = proc.communicate(timeout=120)[0]
  assert proc.returncode == 0, output
  proc = start_trainer(tmp_path, workdir, slow=True, data_dir=tiny_data_dir)
  wait_for_training(proc, workdir)
  proc.send_signal(signal.SIGTERM)
  output = proc.communicate(timeout=120)[0]
  assert proc.returncode == 143, output
  steps = checkpoint_lib.Checkpointer(str(workdir), tiny_config().checkpoint).all_steps()
  assert steps and max(steps) < 12, (steps, output)
  proc = start_trainer(tmp_path, workdir, slow=False, data_dir=tiny_data_dir)
  output = proc.communicate(timeout=120)[0]
  assert proc.returncode == 0, output
  assert_bitwise(saved_state(workdir, 12), saved_state(reference, 12))


def test_a_running_trainer_refuses_a_second_and_serves_readers(tmp_path, tiny_data_dir, capsys):
  """The issue-36 scenario: a second `flaxvae train` on a running run's workdir is refused in
  one line, while `flaxvae sample` reads the running run's newest complete checkpoint."""
  workdir = tmp_path / "run"
  proc = start_trainer(tmp_path, workdir, slow=4, data_dir=tiny_data_dir)  # 1.6 s a dispatch
  try:
    wait_for_training(proc, workdir)
    capsys.readouterr()
    status = cli.main(
      ["flaxvae", "train", f"--config={tmp_path / 'tiny_config.py'}", f"--workdir={workdir}"]
    )
    err = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in err, err
    assert f"is in use by another flaxvae train: process {proc.pid} on host" in err, err
    while not (workdir / "checkpoints" / str(STOP_AT)).is_dir() and proc.poll() is None:
      time.sleep(0.05)
    assert cli.main(["flaxvae", "sample", f"--workdir={workdir}", "--n=4"]) == 0
  finally:
    output = proc.communicate(timeout=120)[0]
  assert proc.returncode == 0, output  # the first run was never disturbed
  assert not (workdir / workdir_lock.LOCK_NAME).exists()  # released at its end


def test_second_signal_exits_at_once_keeping_the_last_checkpoint(tmp_path, tiny_data_dir):
  workdir = tmp_path / "run"
  proc = start_trainer(tmp_path, workdir, slow=True, data_dir=tiny_data_dir)
  wait_for_training(proc, workdir)
  proc.send_signal(signal.SIGTERM)
  time.sleep(0.2)  # two signals before the handler runs would reach Python as one
  proc.send_signal(signal.SIGTERM)
  output = proc.communicate(timeout=60)[0]
  assert proc.returncode == preemption.EXIT_FORCED, output
  checkpointer = checkpoint_lib.Checkpointer(str(workdir), tiny_config().checkpoint)
  for step in checkpointer.all_steps():  # whatever is listed is complete
    assert int(saved_state(workdir, step)["step"]) == step


def nan_kl_weight(from_step, to_step):
  """Fault injection: a KL weight that is NaN for steps [from_step, to_step)."""
  original = bounds.kl_weight
  return lambda step, beta, warmup: jnp.where(
    (step >= from_step) & (step < to_step), jnp.nan, original(step, beta, warmup)
  )


def test_a_nan_step_is_skipped_and_training_continues(tmp_path, monkeypatch):
  monkeypatch.setattr(bounds, "kl_weight", nan_kl_weight(4, 5))
  final = train(tiny_config(), str(tmp_path))
  state = saved_state(tmp_path, 12)
  assert int(state["skipped"]) == 1 and int(state["step"]) == 12
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))
  assert np.isfinite(final["elbo"])
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert any(r.get("skipped", 0) > 0 for r in rows if r.get("step") == 6)


def test_a_stream_of_nans_stops_naming_the_step_and_last_checkpoint(tmp_path, monkeypatch):
  monkeypatch.setattr(bounds, "kl_weight", nan_kl_weight(4, 10**9))
  with pytest.raises(Diverged, match=r"up to step 9 .*last good checkpoint: step 6"):
    train(tiny_config(max_consecutive_skips=3), str(tmp_path))
  assert checkpoint_lib.Checkpointer(str(tmp_path), tiny_config().checkpoint).all_steps() == [6]


def test_adaptive_threshold_follows_a_lasting_change_of_norms():
  cfg = step_lib.StepConfig(
    protocols.PROTOCOLS.get("grey"), adaptive_skip=2.0, adaptive_skip_quantile=0.5
  )
  guard = guards.init(2.0, 40)
  for _ in range(40):
    guard = guards.update(guard, jnp.float32(1.0))
  assert float(guards.threshold(guard, cfg)) == 2.0
  skipped = 0
  for _ in range(60):  # the norms jump to 10 for good: skipped at first, then accepted
    skipped += int(10.0 > guards.threshold(guard, cfg))
    guard = guards.update(guard, jnp.float32(10.0))
  assert 0 < skipped < 40 and float(guards.threshold(guard, cfg)) == 20.0
  guard = guards.update(guard, jnp.float32(jnp.nan))  # non-finite norms never enter
  assert float(guards.threshold(guard, cfg)) == 20.0


def test_truncated_latest_checkpoint_falls_back_to_the_previous(reference, tmp_path, caplog):
  workdir = tmp_path / "copy"
  shutil.copytree(reference, workdir)
  for path in (workdir / "checkpoints" / "12" / "state").rglob("*"):
    if path.is_file() and path.stat().st_size > 0:
      with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
  run = Run(tiny_config(), DATASET)
  target = checkpoint_lib.abstract_like(run.initial_state(), run.runner.sharding())
  checkpointer = checkpoint_lib.Checkpointer(str(workdir), tiny_config().checkpoint)
  with caplog.at_level(logging.WARNING, logger="flaxvae"):
    step, state, data_state, _ = checkpointer.restore_latest(
      target, config_lib.to_json(tiny_config())
    )
  assert step == 6 and int(state.step) == 6 and data_state["position"] == 32
  assert "step 12" in caplog.text and "falling back to step 6" in caplog.text
  # Set aside only once the run may write: a run refused by a later check changes nothing.
  assert (workdir / "checkpoints" / "12").is_dir()
  checkpointer.start_writing()
  assert checkpointer.all_steps() == [6]  # 12 was set aside, not deleted
  assert list((workdir / "checkpoints").glob("12.unreadable-*"))
  checkpointer.close()


def test_a_step_that_does_not_fit_the_model_is_refused_not_set_aside(reference, tmp_path):
  """Another model's shapes (a model change allowed by allow_config_change) make a step fail to
  read with its files intact: a one-line CheckpointError, and every step stays where it was,
  instead of being set aside as damaged and the run starting again from step 0."""
  workdir = tmp_path / "copy"
  shutil.copytree(reference, workdir)
  config = tiny_config(**{"model.latent_dim": 3, "checkpoint.allow_config_change": True})
  run = Run(config, DATASET)
  target = checkpoint_lib.abstract_like(run.initial_state(), run.runner.sharding())
  checkpointer = checkpoint_lib.Checkpointer(str(workdir), config.checkpoint)
  with pytest.raises(CheckpointError, match="step 12 .* its files look intact") as refused:
    checkpointer.restore_latest(target, config_lib.to_json(config))
  assert "\n" not in str(refused.value) and "not compatible with the stored shape" in str(
    refused.value
  )
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["12", "6"]


@contextlib.contextmanager
def read_only(path):
  """`path` made read-only: by permissions, or (as root, who ignores them) a read-only bind
  mount."""
  if os.geteuid() != 0:
    modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
    for p in modes:
      p.chmod(modes[p] & ~0o222)
    try:
      yield
    finally:
      for p, mode in modes.items():
        p.chmod(mode)
    return
  if subprocess.run(
    ["mount", "--bind", "-o", "ro", str(path), str(path)], capture_output=True
  ).returncode:
    pytest.skip("running as root without permission to mount a read-only directory")
  try:
    yield
  finally:
    subprocess.run(["umount", str(path)], check=True)


def test_read_only_workdir_fails_cleanly_leaving_checkpoints(reference, tmp_path):
  workdir = tmp_path / "copy"
  shutil.copytree(reference, workdir)
  before = conftest.tree_digest(workdir)
  with read_only(workdir):
    with pytest.raises(checkpoint_lib.CheckpointError, match="could not lock .* for writing"):
      train(tiny_config(num_steps=18, **{"checkpoint.allow_config_change": True}), str(workdir))
  assert conftest.tree_digest(workdir) == before


@contextlib.contextmanager
def small_disk(path, size="2m"):
  """A tmpfs of `size` at `path` (root only: mounting needs it)."""
  path.mkdir()
  if (
    os.geteuid() != 0
    or subprocess.run(
      ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    ).returncode
  ):
    pytest.skip("needs root and permission to mount a tmpfs to fill a disk")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], check=True)


def fill(directory):
  with open(directory / "filler", "wb", buffering=0) as f:
    with contextlib.suppress(OSError):
      while True:
        f.write(b"\0" * 4096)


def test_disk_full_mid_run_fails_in_one_line_keeping_the_last_checkpoint(
  reference, tmp_path, monkeypatch
):
  with small_disk(tmp_path / "disk") as disk:
    workdir = disk / "run"
    shutil.copytree(reference, workdir)
    check_writable = checkpoint_lib.Checkpointer.check_writable
    # The disk fills up after the start-up check passed: the next write in the run fails.
    monkeypatch.setattr(
      checkpoint_lib.Checkpointer, "check_writable", lambda self: (check_writable(self), fill(disk))
    )
    with pytest.raises(CheckpointError, match="No space left on device.*Free space") as failed:
      train(tiny_config(num_steps=18, **{"checkpoint.allow_config_change": True}), str(workdir))
    assert "\n" not in str(failed.value)
    (disk / "filler").unlink()
    assert_bitwise(saved_state(workdir, 12), saved_state(reference, 12))
    assert checkpoint_lib.Checkpointer(str(workdir), tiny_config().checkpoint).latest_step() == 12


def test_keeps_the_last_n_and_the_best_elbo_steps(tmp_path):
  config = tiny_config(**{"checkpoint.max_to_keep": 2, "checkpoint.keep_best": 1}).checkpoint
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), config)
  checkpointer.start_writing()
  elbos = {2: -50.0, 4: -40.0, 6: -45.0, 8: -60.0}  # step 4 is the best; odd steps have no eval
  for step in range(1, 10):
    row = {"elbo": elbos[step]} if step in elbos else None
    checkpointer.save(step, {"w": jnp.full((3,), float(step))}, {}, {}, row)
    checkpointer.wait()
  checkpointer.close()
  assert sorted(checkpointer.all_steps()) == [4, 8, 9]
  kept = ocp.StandardCheckpointer().restore(tmp_path.absolute() / "checkpoints" / "4" / "state")
  np.testing.assert_array_equal(kept["w"], np.full((3,), 4.0))


def test_changed_model_shape_is_refused_naming_the_field(reference, tmp_path):
  workdir = tmp_path / "copy"
  shutil.copytree(reference, workdir)
  before = conftest.tree_digest(workdir)
  with pytest.raises(ConfigError, match=r"model\.latent_dim: 2 -> 3.*allow_config_change=True"):
    train(tiny_config(**{"model.latent_dim": 3}), str(workdir))
  assert conftest.tree_digest(workdir) == before
