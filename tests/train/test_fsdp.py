"""Sharded parameters (FSDP) and gradient accumulation through train(), and checkpoints that
move between meshes."""

import pathlib

import jax
import numpy as np
import pytest

from flaxvae.errors import ConfigError
from flaxvae.run import Run
from flaxvae.train import checkpoint as checkpoint_lib
from flaxvae.train.trainer import train
from tests.conftest import array_dataset, tiny_config

STEPS = 8


def config(**changes):
  """An MLP whose weight matrices (784x64, 64x784) are big enough to be split over fsdp."""
  return tiny_config(
    num_steps=STEPS,
    steps_per_dispatch=4,
    log_every_steps=2,
    batch_size=32,
    **{"model.hidden": (64,), "model.latent_dim": 4, "checkpoint.every_steps": 0, **changes},
  )


def losses(workdir):
  import json

  rows = [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return [r["loss"] for r in rows if r["split"] == "train"]


def final_params(workdir):
  return checkpoint_lib.read_state(pathlib.Path(workdir) / "checkpoints" / str(STEPS) / "state")[
    "params"
  ]


def close(a, b, rtol=2e-4, atol=3e-5):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def test_params_are_split_over_fsdp_and_train_as_on_one_device(tmp_path, compilation_cache):
  dataset = array_dataset(128, 16)
  train(config(**{"parallel.num_devices": 1}), str(tmp_path / "one"), dataset)
  reference = final_params(tmp_path / "one")
  for name, mesh in (("data8", ""), ("fsdp4", "data:2,fsdp:4"), ("fsdp8", "fsdp:8")):
    train(config(**{"parallel.mesh": mesh}), str(tmp_path / name), dataset)
    np.testing.assert_allclose(losses(tmp_path / name), losses(tmp_path / "one"), rtol=1e-5)
    close(final_params(tmp_path / name), reference)
  # The fsdp run really holds slices: a 784x64 kernel is split 4 ways, biases stay whole.
  run = Run(config(**{"parallel.mesh": "data:2,fsdp:4"}), dataset)
  specs = run.runner.state_specs(run.initial_state())
  assert tuple(specs.params["encoder"][0]["kernel"]) == ("fsdp", None)  # 784 rows, split 4 ways
  assert tuple(specs.params["encoder"][0]["bias"]) == (None,)
  assert tuple(specs.opt_state[0].mu["encoder"][0]["kernel"]) == ("fsdp", None)


def test_accumulating_four_microbatches_equals_one_four_times_larger_batch(
  tmp_path, compilation_cache
):
  dataset = array_dataset(128, 16)
  train(config(), str(tmp_path / "large"), dataset)
  train(config(**{"optimizer.accumulate_steps": 4}), str(tmp_path / "micro"), dataset)
  np.testing.assert_allclose(losses(tmp_path / "micro"), losses(tmp_path / "large"), rtol=1e-5)
  close(final_params(tmp_path / "micro"), final_params(tmp_path / "large"))


def test_a_checkpoint_written_with_fsdp_restores_bitwise_on_other_meshes(
  tmp_path, compilation_cache
):
  dataset = array_dataset(128, 16)
  written = config(**{"parallel.mesh": "data:2,fsdp:4"})
  train(written, str(tmp_path), dataset)
  saved = checkpoint_lib.read_state(tmp_path / "checkpoints" / str(STEPS) / "state")
  for changes in (
    {"parallel.num_devices": 1},
    {"parallel.mesh": "data:2,fsdp:4"},
    {"parallel.mesh": "data:8"},
    {"parallel.mesh": "fsdp:8"},
  ):
    run = Run(config(**changes), dataset)
    state = run.initial_state()
    target = checkpoint_lib.abstract_like(state, run.runner.state_shardings(state))
    checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), written.checkpoint)
    restored, _, _ = checkpointer.restore(STEPS, target)
    checkpointer.close()
    kernel = restored.params["encoder"][0]["kernel"]
    assert kernel.sharding == target.params["encoder"][0]["kernel"].sharding
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(saved["params"])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
  "changes, message",
  [
    ({"parallel.mesh": "data:3,fsdp:4"}, "has 12 devices but 8 are used"),
    ({"parallel.mesh": "model:8"}, "give data:N and/or fsdp:M"),
    ({"parallel.mesh": "fsdp:8", "parallel.backend": "pmap"}, "pmap backend is pure data"),
    ({"parallel.mesh": "fsdp:8", "optimizer.name": "lamb"}, "lamb scales each parameter"),
    ({"optimizer.accumulate_steps": 3}, "do not split into optimizer.accumulate_steps=3"),
    ({"optimizer.accumulate_steps": 2, "objective.free_bits": 0.5}, "use optimizer.accumulate"),
  ],
)
def test_meshes_and_microbatches_that_cannot_work_are_refused(changes, message):
  with pytest.raises(ConfigError, match=message):
    Run(config(**changes), array_dataset(64, 16))
