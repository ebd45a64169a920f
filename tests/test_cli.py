"""The `flaxvae` command: a short real run, and one-line errors for bad inputs that touch
nothing."""

import json
import os
import pathlib
import subprocess
import sys
import types

import pytest

import flaxvae
from flaxvae import cli
from flaxvae.errors import UsageError
from tests.conftest import FLAXVAE, REPO, tree_digest

MLP_CONFIG = str(REPO / "configs" / "fashion_mnist_mlp.py")


@pytest.fixture
def workdir_with_checkpoint(tmp_path):
  workdir = tmp_path / "run"
  (workdir / "checkpoints" / "100").mkdir(parents=True)
  (workdir / "checkpoints" / "100" / "state").write_bytes(b"precious")
  return workdir


@pytest.mark.parametrize(
  "flag, message",
  [
    ("--config.model.no_such_key=3", "unknown config key 'model.no_such_key'"),
    ("--config.model.hiddn=(3,)", "did you mean model.hidden"),
    ("--config.data.binarization=dynamic", "renamed: use data.protocol"),
    ("--config.dtype=float16", "use bfloat16"),
    ("--config.batch_size=0", "batch_size must be positive"),
    ("--config.batch_size=12", "does not divide evenly over 8 devices"),
    ("--config.model.name=resnet", "unknown model.name 'resnet'"),
    ("--config.data.source_dir={tmp}/missing", "has no Fashion-MNIST IDX files"),
    ("--config.optimizer.name=sgdx", "unknown optimizer.name"),
  ],
)
def test_bad_inputs_fail_in_one_line_and_touch_nothing(
  capsys, tmp_path, workdir_with_checkpoint, flag, message
):
  before = tree_digest(workdir_with_checkpoint)
  flag = flag.format(tmp=tmp_path)
  status = cli.main(
    [
      "flaxvae",
      "train",
      f"--config={MLP_CONFIG}",
      f"--workdir={workdir_with_checkpoint}",
      flag,
      f"--config.data.data_dir={tmp_path}/tfds",
    ]
  )
  err = capsys.readouterr().err.strip()
  assert status == 2
  assert message in err and "\n" not in err, err
  assert tree_digest(workdir_with_checkpoint) == before


def test_missing_flags_and_unknown_command(capsys):
  assert cli.main(["flaxvae", "train"]) == 2
  assert "needs --config" in capsys.readouterr().err
  assert cli.main(["flaxvae", "fly"]) == 2


def test_prepare_data_names_come_from_the_dataset_registry(capsys):
  assert cli.main(["flaxvae", "prepare-data", "no_such_data"]) == 2
  err = capsys.readouterr().err
  assert "binarized_mnist, celeb_a, cifar10" in err and "fashion_mnist" in err
  assert err.strip().endswith("folder")


def test_a_stray_positional_argument_is_refused(capsys, tmp_path):
  status = cli.main(
    ["flaxvae", "train", "train", f"--config={MLP_CONFIG}", f"--workdir={tmp_path}/run"]
  )
  err = capsys.readouterr().err.strip()
  assert status == 2 and "unexpected argument(s) 'train'" in err and "\n" not in err
  assert not (tmp_path / "run").exists()


def test_a_mistyped_config_path_names_the_configs_there(capsys, tmp_path):
  status = cli.main(
    [
      "flaxvae",
      "train",
      "--config",
      str(REPO / "configs" / "fashion_mnist_mpl.py"),
      f"--workdir={tmp_path}/run",
    ]
  )
  err = capsys.readouterr().err.strip()
  assert status == 2 and "\n" not in err
  assert "not found: did you mean" in err and "fashion_mnist_mlp.py" in err


def test_console_script_exit_status(tmp_path):
  flaxvae = pathlib.Path(sys.executable).parent / "flaxvae"
  result = subprocess.run(
    [
      str(flaxvae),
      "train",
      f"--config={MLP_CONFIG}",
      f"--workdir={tmp_path}/run",
      "--config.batch_size=-5",
    ],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith("flaxvae train: error: batch_size")
  assert not (tmp_path / "run").exists()


def test_short_training_run_writes_every_output(tmp_path, capsys, caplog, tiny_data_dir):
  workdir = tmp_path / "run"
  status = cli.main(
    [
      "flaxvae",
      "train",
      f"--config={MLP_CONFIG}",
      f"--workdir={workdir}",
      "--config.data.name=tiny",
      f"--config.data.data_dir={tiny_data_dir}",
      "--config.num_steps=20",
      "--config.steps_per_dispatch=5",
      "--config.log_every_steps=10",
      "--config.eval.every_steps=10",
      "--config.checkpoint.every_steps=10",
      "--config.batch_size=32",
      "--config.model.hidden=(16,)",
      "--config.eval.num_examples=64",
      "--config.eval.final_num_importance_samples=10",
      "--config.eval.num_importance_samples=5",
      "--config.eval.amortization_examples=8",
      "--config.eval.amortization_steps=5",
    ]
  )
  assert status == 0, capsys.readouterr().err
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  train_rows = [r for r in rows if r["split"] == "train"]
  assert [r["step"] for r in train_rows] == [10, 20]
  for key in ("loss", "rate", "distortion", "examples_per_s", "learning_rate", "rate_by_layer"):
    assert key in train_rows[0]
  assert any(r["split"] == "test" and "elbo" in r for r in rows)
  assert json.loads((workdir / "config.json").read_text())["batch_size"] == 32
  assert any(p.name.startswith("events") for p in (workdir / "tensorboard").iterdir())
  assert any(p.suffix == ".png" for p in (workdir / "images").iterdir())
  assert sorted(os.listdir(workdir / "checkpoints"))[:2] == ["10", "20"]
  out = capsys.readouterr().out
  assert "workdir:" in out and "test log p(x) >= " in out and "(IWAE, K=10); test ELBO" in out, out
  # `flaxvae sample`: a temperature grid and a latent-level grid.
  assert cli.main(["flaxvae", "sample", f"--workdir={workdir}", "--temperature=0.7", "--n=8"]) == 0
  assert cli.main(["flaxvae", "sample", f"--workdir={workdir}", "--keep_layers=0,1"]) == 0
  made = sorted(
    p.name for p in (workdir / "images").iterdir() if p.name.startswith(("samples_t", "layers_"))
  )
  assert made == ["layers_0-1_step20.png", "samples_t0.7_step20.png"], made
  # Orbax warns on every read-only open (each `sample` above): that stays out of the console.
  assert not [r for r in caplog.records if "read only" in r.getMessage()]
  capsys.readouterr()
  assert cli.main(["flaxvae", "sample", f"--workdir={workdir}", "--keep_layers=2"]) == 2
  err = capsys.readouterr().err
  assert "keep_layers 2 is not a count of the model's 1 latent layers" in err, err
  with pytest.raises(UsageError, match="keep_layers -1 is not a count"):  # the Python API too
    flaxvae.load(str(workdir)).reconstruct(None, None, keep_layers=-1)


@pytest.mark.slow
def test_the_console_shows_no_tpu_message_without_a_tpu(tmp_path, tiny_data_dir):
  """JAX logs at INFO that it could not open libtpu; flaxvae shows only WARNING and up.

  The child runs without the suite's JAX_PLATFORMS=cpu, as on a user's machine: with it, JAX
  never probes for a TPU and there would be no message to hide.
  """
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "JAX_PLATFORM_NAME")}
  result = subprocess.run(
    [
      str(FLAXVAE),
      "train",
      f"--config={MLP_CONFIG}",
      f"--workdir={tmp_path}/run",
      "--config.data.name=tiny",
      f"--config.data.data_dir={tiny_data_dir}",
      "--config.num_steps=2",
      "--config.steps_per_dispatch=1",
      "--config.batch_size=16",
      "--config.model.hidden=(8,)",
      "--config.eval.final_num_importance_samples=2",
      "--config.eval.amortization_examples=0",
    ],
    capture_output=True,
    text=True,
    timeout=300,
    env=env,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert "libtpu" not in result.stderr + result.stdout
  assert "devices:" in result.stderr  # flaxvae's own INFO lines still show


def test_the_command_drops_only_late_callbacks_after_a_closed_loop(monkeypatch):
  """A failed restore leaves Orbax's tensorstore callbacks to arrive after its event loop is
  closed; the command does not print their tracebacks, and every other unraisable error still
  reaches the previous hook."""
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  cli._quiet_late_callbacks()
  late = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
  other = types.SimpleNamespace(exc_value=RuntimeError("something else"))
  sys.unraisablehook(late)
  sys.unraisablehook(other)
  assert seen == [other]


def test_a_checkpoint_of_another_model_is_refused_in_one_line_and_kept(tmp_path, tiny_data_dir):
  """Resuming under a model change that allow_config_change lets through: the program prints
  its one line (no traceback from the restore Orbax abandoned), exits 2, and the checkpoint
  stays where it was, not set aside as damaged."""
  workdir = tmp_path / "run"
  flags = [
    f"--config={MLP_CONFIG}",
    f"--workdir={workdir}",
    "--config.data.name=tiny",
    f"--config.data.data_dir={tiny_data_dir}",
    "--config.num_steps=4",
    "--config.batch_size=8",
    "--config.model.hidden=(16,)",
    "--config.eval.final_num_importance_samples=2",
    "--config.eval.final_num_examples=8",
    "--config.eval.amortization_examples=0",
  ]
  assert cli.main(["flaxvae", "train", *flags]) == 0
  result = subprocess.run(
    [
      str(FLAXVAE),
      "train",
      *flags,
      "--config.model.latent_dim=3",
      "--config.checkpoint.allow_config_change=True",
    ],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 2, result.stderr
  assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("flaxvae train: error: checkpoint step 4 in ") and "look intact" in last
  assert sorted(os.listdir(workdir / "checkpoints")) == ["4"]
