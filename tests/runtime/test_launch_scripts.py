"""The launch scripts run for real against recording stand-ins of what they start (flaxvae, srun,
gcloud), so the commands they would run on a cluster are checked here, in seconds: each process's
id, count and coordinator, and `flaxvae train` parsing the flags of each script's own example.

Real multi-process training through launch/local.sh is in test_multihost.py (slow suite).
"""

import json
import os
import re
import shlex
import subprocess
import sys

import jax
import pytest

from flaxvae import cli, defaults
from flaxvae.runtime import distributed
from tests.conftest import REPO

LAUNCH = REPO / "launch"

# Stands in for flaxvae, srun or gcloud: records its argv and environment, then exits as the
# STUB_* variables ask (a process that fails, one that keeps running, a TPU that does not exist).
RECORDER = f"""#!{sys.executable}
import json, os, sys, time
env = os.environ
record = os.path.join(env["STUB_RECORD_DIR"], f"{{time.monotonic_ns()}}-{{os.getpid()}}.json")
with open(record, "w") as f:
  json.dump({{"argv": sys.argv, "env": dict(env)}}, f)
if "describe" in sys.argv and env.get("STUB_NO_TPU"):
  sys.exit(1)
failing = env.get("STUB_FAILING_PROCESS")
if failing is not None and failing == env.get("FLAXVAE_PROCESS_ID"):
  deadline = time.monotonic() + 30  # fails once every process has started
  while len(os.listdir(env["STUB_RECORD_DIR"])) < int(env["STUB_PROCESSES"]):
    assert time.monotonic() < deadline
    time.sleep(0.05)
  sys.exit(3)
time.sleep(float(env.get("STUB_SECONDS", "0")))
"""


@pytest.fixture
def stubs(tmp_path):
  """(bin folder holding flaxvae/srun/gcloud recorders, environment to run a script in)."""
  bin_dir, records = tmp_path / "bin", tmp_path / "records"
  bin_dir.mkdir()
  records.mkdir()
  for name in ("flaxvae", "srun", "gcloud"):
    (bin_dir / name).write_text(RECORDER)
    (bin_dir / name).chmod(0o755)
  env = {
    k: v
    for k, v in os.environ.items()
    if k not in ("JAX_PLATFORMS", "XLA_FLAGS") and not k.startswith(("FLAXVAE", "SLURM"))
  }
  env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", STUB_RECORD_DIR=str(records))
  return bin_dir, env


def recorded(env):
  """What the stand-ins were called with, in the order they were called."""
  folder = env["STUB_RECORD_DIR"]
  return [
    json.loads(open(os.path.join(folder, name)).read())
    for name in sorted(os.listdir(folder), key=lambda n: int(n.split("-")[0]))
  ]


def documented_example(script):
  """The example command in the script's header: (environment it sets, the script's arguments)."""
  lines = (LAUNCH / script).read_text().splitlines()
  start = next(i for i, line in enumerate(lines) if "Example" in line) + 1
  command = []
  for line in lines[start:]:
    command.append(line.lstrip("#").strip().rstrip("\\"))
    if not line.endswith("\\"):
      break
  words = shlex.split(" ".join(command))
  at = next(i for i, word in enumerate(words) if word.endswith(f"launch/{script}"))
  env = dict(word.split("=", 1) for word in words[:at] if re.match(r"^[A-Z_]+=", word))
  return env, words[at + 1 :]


def assert_train_flags_parse(args, capsys, monkeypatch):
  """`flaxvae train ARGS --help` parses ARGS as the command would (nothing runs) and the config
  file they name loads."""
  monkeypatch.chdir(REPO)
  try:
    status = cli.main(["flaxvae", "train", *args, "--help"])
  except SystemExit as e:
    status = e.code
  assert status == 0, capsys.readouterr().err
  config = next(
    a.split("=", 1)[1] if "=" in a else args[i + 1]
    for i, a in enumerate(args)
    if a.split("=", 1)[0] == "--config"
  )
  assert defaults.load_config_file(*config.split(":", 1)).keys()


def test_local_sh_starts_n_processes_that_find_each_other(stubs, capsys, monkeypatch):
  bin_dir, env = stubs
  _, (count, *args) = documented_example("local.sh")
  env.update(FLAXVAE=str(bin_dir / "flaxvae"), DEVICES_PER_PROCESS="3")
  result = subprocess.run(
    [str(LAUNCH / "local.sh"), count, *args], env=env, capture_output=True, text=True, timeout=60
  )
  assert result.returncode == 0, result.stderr
  processes = recorded(env)
  assert len(processes) == int(count)
  addresses = {p["env"]["FLAXVAE_COORDINATOR_ADDRESS"] for p in processes}
  assert len(addresses) == 1 and re.fullmatch(r"127\.0\.0\.1:\d+", addresses.pop())
  ids = []
  for p in processes:
    assert p["argv"][1:] == ["train", *args]
    assert p["env"]["JAX_PLATFORMS"] == "cpu"
    assert p["env"]["XLA_FLAGS"] == "--xla_force_host_platform_device_count=3"
    for key in ("FLAXVAE_COORDINATOR_ADDRESS", "FLAXVAE_NUM_PROCESSES", "FLAXVAE_PROCESS_ID"):
      monkeypatch.setenv(key, p["env"][key])
    address, num_processes, index = distributed.explicit_settings()  # what flaxvae reads
    assert (address, num_processes) == (p["env"]["FLAXVAE_COORDINATOR_ADDRESS"], int(count))
    ids.append(index)
  assert sorted(ids) == list(range(int(count)))
  assert_train_flags_parse(args, capsys, monkeypatch)


def test_local_sh_stops_the_others_when_one_process_fails(stubs):
  bin_dir, env = stubs
  # Process 1 fails once all three run; the others would sleep past the timeout, so the script
  # returns only once it stopped them.
  env.update(
    FLAXVAE=str(bin_dir / "flaxvae"),
    STUB_FAILING_PROCESS="1",
    STUB_PROCESSES="3",
    STUB_SECONDS="120",
  )
  result = subprocess.run(
    [str(LAUNCH / "local.sh"), "3", "--workdir=unused"],
    env=env,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert result.returncode == 3
  assert len(recorded(env)) == 3
  for bad in ([], ["two"], ["0"]):
    result = subprocess.run(
      [str(LAUNCH / "local.sh"), *bad], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and result.stderr.startswith("usage: launch/local.sh N")


def test_slurm_sbatch_runs_flaxvae_train_as_one_srun_step(stubs, capsys, monkeypatch):
  _, env = stubs
  _, args = documented_example("slurm.sbatch")
  env.update(SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_ID="1")  # as sbatch sets them
  # sbatch runs the script with its shebang's interpreter (no execute bit needed).
  result = subprocess.run(
    ["bash", str(LAUNCH / "slurm.sbatch"), *args],
    env=env,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert result.returncode == 0, result.stderr
  [srun] = recorded(env)
  assert srun["argv"][1:] == ["--kill-on-bad-exit=1", f"{REPO}/.venv/bin/flaxvae", "train", *args]
  # No FLAXVAE_* settings: flaxvae lets JAX find its peers from SLURM's variables.
  assert not any(k.startswith("FLAXVAE") for k in srun["env"])
  assert "SLURM_JOB_ID" in distributed.CLUSTER_MARKERS
  assert_train_flags_parse(args, capsys, monkeypatch)


def test_tpu_pod_sh_creates_installs_and_trains_on_every_worker(stubs, capsys, monkeypatch):
  _, env = stubs
  example_env, args = documented_example("tpu_pod.sh")
  args = [*args, "--config.data.source_dir=/data/a folder"]  # quoted through ssh intact
  env.update(example_env, REPO_URL="https://example.invalid/flaxvae.git", STUB_NO_TPU="1")
  result = subprocess.run(
    [str(LAUNCH / "tpu_pod.sh"), *args], env=env, capture_output=True, text=True, timeout=60
  )
  assert result.returncode == 0, result.stderr
  describe, create, install, train = [call["argv"][1:] for call in recorded(env)]
  where = [example_env["TPU_NAME"], "--zone", example_env["ZONE"]]
  assert describe == ["compute", "tpus", "tpu-vm", "describe", *where]
  assert create[:7] == ["compute", "tpus", "tpu-vm", "create", *where]
  assert create[create.index("--accelerator-type") + 1] == example_env["ACCELERATOR"]
  for ssh in (install, train):
    assert ssh[:8] == ["compute", "tpus", "tpu-vm", "ssh", *where, "--worker=all"]
  assert "make install" in install[-1] and f"'jax[tpu]=={jax.__version__}'" in install[-1]
  assert shlex.split(train[-1]) == ["cd", "flaxvae", "&&", ".venv/bin/flaxvae", "train", *args]
  assert_train_flags_parse(args, capsys, monkeypatch)
  # A slice that exists is reused; without TPU_NAME nothing is called.
  for name in os.listdir(env["STUB_RECORD_DIR"]):
    os.remove(os.path.join(env["STUB_RECORD_DIR"], name))
  del env["STUB_NO_TPU"]
  assert (
    subprocess.run(
      [str(LAUNCH / "tpu_pod.sh"), *args], env=env, capture_output=True, timeout=60
    ).returncode
    == 0
  )
  assert [call["argv"][4] for call in recorded(env)] == ["describe", "ssh", "ssh"]
  del env["TPU_NAME"]
  result = subprocess.run(
    [str(LAUNCH / "tpu_pod.sh"), *args], env=env, capture_output=True, text=True, timeout=60
  )
  assert result.returncode != 0 and "set TPU_NAME" in result.stderr
  assert len(recorded(env)) == 3


def test_the_cuda_and_tpu_installs_named_pin_the_verified_jax():
  for script in ("slurm.sbatch", "tpu_pod.sh"):
    pins = re.findall(r"jax\[\w+\]==([\w.]+)", (LAUNCH / script).read_text())
    assert pins and set(pins) == {jax.__version__}, script


def test_gke_jobset_is_well_formed(capsys, monkeypatch):
  yaml = pytest.importorskip("yaml")
  doc = yaml.safe_load((LAUNCH / "gke.yaml").read_text())
  assert doc["apiVersion"].startswith("jobset.x-k8s.io/") and doc["kind"] == "JobSet"
  job = doc["spec"]["replicatedJobs"][0]["template"]["spec"]
  assert job["parallelism"] == job["completions"]
  container = job["template"]["spec"]["containers"][0]
  assert container["command"] == [".venv/bin/flaxvae", "train"]
  assert_train_flags_parse(container["args"], capsys, monkeypatch)
