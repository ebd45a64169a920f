"""Shared fixtures. Tests run on 8 simulated CPU devices: the flag is set before jax is imported.

Runs get their data as arguments (`data.ArrayDataset`, or a tiny dataset written to disk by the
real folder converter for subprocesses and the streaming path), never by patching a module.
"""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flaxvae

flaxvae.apply_process_defaults()  # the XLA flags the `flaxvae` command runs with

import hashlib  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from flaxvae import data as data_lib  # noqa: E402
from flaxvae import defaults  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
FLAXVAE = pathlib.Path(sys.executable).parent / "flaxvae"
CACHE_OPTIONS = {
  "jax_compilation_cache_dir": None,
  "jax_persistent_cache_min_compile_time_secs": 0.0,
  "jax_persistent_cache_min_entry_size_bytes": 0,
}


def random_images(n, seed=0, shape=(28, 28, 1)):
  return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def tree_digest(root):
  """A hash of every file's name and bytes under `root`: equal before and after means untouched."""
  digest = hashlib.sha256()
  for path in sorted(pathlib.Path(root).rglob("*")):
    digest.update(str(path.relative_to(root)).encode())
    if path.is_file():
      digest.update(path.read_bytes())
  return digest.hexdigest()


def array_dataset(train=256, test=64, shape=(28, 28, 1)):
  """Random uint8 images as a dataset in memory: what `train(config, workdir, dataset)` takes."""
  return data_lib.ArrayDataset(
    {"train": random_images(train, 0, shape), "test": random_images(test, 1, shape)}, name="random"
  )


def load_config(name, arg=None):
  """configs/NAME.py's get_config(arg), as `--config configs/NAME.py:arg` loads it."""
  return defaults.load_config_file(str(REPO / "configs" / f"{name}.py"), arg or None)


set_keys = defaults.set_keys  # {"a.b.c": value} into a ConfigDict, in place


def tiny_config(model="mlp", **changes):
  """A run that trains and evaluates in seconds: a tiny model, small batches, cheap evaluation."""
  c = defaults.base_config()
  c.model = {
    "mlp": defaults.model_config("mlp", hidden=(16,), latent_dim=2),
    "conv": defaults.model_config("conv", latent_dim=2, channels=(8, 8)),
    "ladder_mlp": defaults.model_config("ladder_mlp", hidden=((16,), (8,)), latent_dims=(4, 2)),
  }.get(model) or defaults.model_config(model)
  c.batch_size, c.num_steps, c.steps_per_dispatch, c.log_every_steps = 16, 12, 3, 3
  c.data.protocol = "binarized"
  c.checkpoint.every_steps = 6
  c.eval.every_steps, c.eval.batch_size, c.eval.num_examples = 0, 16, 16
  c.eval.num_importance_samples, c.eval.final_num_importance_samples = 2, 2
  c.eval.amortization_examples, c.eval.num_image_samples = 0, 4
  return set_keys(c, **changes)


@pytest.fixture(scope="session")
def compilation_cache(tmp_path_factory):
  """One persistent compilation cache for the session's runs (and trainer subprocesses).

  Every `train()` compiles the same functions again; a cache shared by them (dropped
  afterwards) makes the suite several times faster.
  """
  options = dict(CACHE_OPTIONS, jax_compilation_cache_dir=str(tmp_path_factory.mktemp("jit")))
  previous = {k: getattr(jax.config, k) for k in options}
  with pytest.MonkeyPatch.context() as mp:
    for key, value in options.items():
      jax.config.update(key, value)
      mp.setenv(key.upper(), str(value))  # inherited by subprocesses
    yield
  for key, value in previous.items():
    jax.config.update(key, value)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
  """A data dir holding `tiny` (96 random 28x28 images, 72 train / 24 test), written by the real
  folder converter, for subprocesses and the streaming path."""
  root = tmp_path_factory.mktemp("tiny_data")
  source = root / "source"
  source.mkdir()
  np.save(source / "images.npy", random_images(96))
  subprocess.run(
    [
      str(FLAXVAE),
      "prepare-data",
      "folder",
      f"--source={source}",
      "--name=tiny",
      "--test_fraction=0.25",
      f"--data_dir={root / 'tfds'}",
    ],
    check=True,
    capture_output=True,
    timeout=300,
  )
  return root / "tfds"


def pytest_configure(config):
  config.addinivalue_line(
    "markers",
    "slow: deep-model compiles and multi-process runs (`make test-slow`; CI runs "
    "them after `make test`)",
  )
