"""The trainer's own behaviour: dispatch sizes, checkpoint intervals, nothing written before
the checks pass, refused combinations, progress lines, and inference on other device counts."""

import json
import os
import subprocess

import jax
import numpy as np
import pytest

from flaxvae import settings
from flaxvae.errors import ConfigError, DataError
from flaxvae.run import Run
from flaxvae.runtime import parallel
from flaxvae.train import checkpoint as checkpoint_lib
from flaxvae.train import step as step_lib
from flaxvae.train import trainer
from tests.conftest import FLAXVAE, array_dataset, load_config, set_keys, tiny_config, tree_digest


def sizes(num_steps, steps_per_dispatch, log=1000, evaluate=0, save=0):
  config = settings.resolve(
    tiny_config(
      num_steps=num_steps,
      steps_per_dispatch=steps_per_dispatch,
      log_every_steps=log,
      **{"eval.every_steps": evaluate, "checkpoint.every_steps": save},
    )
  )
  step, out = 0, []
  while step < num_steps:
    out.append(trainer.next_dispatch_size(step, config))
    step += out[-1]
  return out


def test_a_remainder_runs_in_few_dispatches_of_few_sizes():
  assert sizes(2400, 500) == [500] * 4 + [256, 128, 16]
  # Events that do not divide steps_per_dispatch: each piece is a power of two.
  got = sizes(2000, 300, log=1000, save=700)
  assert sum(got) == 2000 and len(set(got)) <= 1 + 9
  assert all(n == 300 or n & (n - 1) == 0 for n in got)
  assert sizes(12, 1) == [1] * 12


def test_checkpoint_every_zero_saves_only_at_the_end(tmp_path):
  c = tiny_config(**{"checkpoint.every_steps": 0})
  trainer.train(c, str(tmp_path), array_dataset(64, 16))
  assert checkpoint_lib.Checkpointer(str(tmp_path), c.checkpoint).all_steps() == [12]


def test_remainder_dispatches_train_and_compile_a_bounded_number_of_times(tmp_path):
  # 11 steps of 4 per dispatch: 4, 4, 2, 1; the trainer's own guard raises on extra compiles.
  c = tiny_config(num_steps=11, steps_per_dispatch=4)
  row = trainer.train(c, str(tmp_path), array_dataset(64, 16))
  assert np.isfinite(row["elbo"])
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if r["split"] == "train"] == [3, 6, 9, 11]


def test_a_refused_resume_writes_nothing(tmp_path):
  c = tiny_config()
  trainer.train(c, str(tmp_path), array_dataset(64, 16))
  (tmp_path / "config.json").unlink()
  before = tree_digest(tmp_path)
  other_size = array_dataset(80, 16)  # the checkpoint's data position belongs to 64 examples
  with pytest.raises(DataError, match="split of 64 examples"):
    trainer.train(
      set_keys(c, num_steps=24, **{"checkpoint.allow_config_change": True}),
      str(tmp_path),
      other_size,
    )
  assert tree_digest(tmp_path) == before and not (tmp_path / "config.json").exists()


def test_a_refused_fresh_run_leaves_no_workdir(tmp_path):
  with pytest.raises(DataError):
    trainer.train(tiny_config(batch_size=64), str(tmp_path / "run"), array_dataset(32, 16))
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
  "changes, message",
  [
    ({"objective.name": "iwae", "objective.beta": 0.5}, "iwae has no KL term, so beta=0.5"),
    ({"objective.name": "iwae", "objective.kl_warmup_steps": 100}, "kl_warmup_steps=100"),
    ({"objective.name": "iwae", "objective.free_bits": 0.1}, "use objective.name=elbo"),
    ({"dtype": "float16"}, "float16 needs loss scaling.*use bfloat16"),
    ({"checkpoint.every_steps": -1}, "checkpoint.every_steps must be >= 0"),
    ({"objective.free_bits_per": "dim"}, "free_bits_per"),
    ({"data.protocol": "binary"}, "unknown data.protocol"),
    ({"model.posterior": "flow"}, "unknown model.posterior"),
  ],
)
def test_combinations_that_would_not_do_what_they_say_are_refused(changes, message):
  """Refused while the run is assembled, before anything is read from disk or written."""
  with pytest.raises(ConfigError, match=message):
    Run(tiny_config(**changes), array_dataset(32, 16))


def test_training_prints_one_plain_line_per_log_step_off_a_terminal(tmp_path, capsys):
  trainer.train(tiny_config(), str(tmp_path), array_dataset(64, 16))
  lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("step ")]
  assert [l.split(",")[0] for l in lines] == [
    f"step {s}/12 ({100 * s // 12}%)" for s in (3, 6, 9, 12)
  ]
  assert not any("\r" in l for l in lines)


def test_final_evaluation_shows_progress(tmp_path, capsys):
  c = tiny_config(**{"eval.final_num_importance_samples": 3, "eval.batch_size": 8})
  trainer.train(c, str(tmp_path), array_dataset(64, 24))
  out = capsys.readouterr().out
  assert "log p(x), K=3: 24/24 (100%)" in out and "examples/s" in out


@pytest.mark.slow
def test_a_run_evaluates_on_another_device_count(tmp_path):
  """Trained with batch 16 on 8 devices and pinned there; evaluated on 3 and on 1."""
  data_dir = tmp_path / "tfds"
  source = tmp_path / "source"
  source.mkdir()
  np.save(
    source / "images.npy",
    np.random.default_rng(0).integers(0, 256, (64, 28, 28, 1), dtype=np.uint8),
  )
  from flaxvae.data import folder

  folder.prepare_folder(str(source), "pinned", 0.25, str(data_dir))
  c = tiny_config(
    **{"data.name": "pinned", "data.data_dir": str(data_dir), "parallel.num_devices": 8}
  )
  trainer.train(c, str(tmp_path / "run"))
  for devices in (3, 1):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    result = subprocess.run(
      [str(FLAXVAE), "evaluate", f"--workdir={tmp_path / 'run'}", "--num_importance_samples=2"],
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "written:" in result.stdout


def test_a_time_budget_ends_training_at_a_log_step_and_evaluates_it(tmp_path):
  c = tiny_config(num_steps=10_000, time_budget_s=1e-9, log_every_steps=3)
  trainer.train(c, str(tmp_path), array_dataset(64, 16))
  steps = checkpoint_lib.Checkpointer(str(tmp_path), c.checkpoint).all_steps()
  assert steps == [3] and json.loads((tmp_path / "eval.json").read_text())["step"] == 3


@pytest.mark.slow  # two training runs: `make test` stays under 10 minutes
def test_a_frozen_trained_decoder_with_a_fresh_encoder_trains_the_encoder_alone(tmp_path):
  """The seed-question experiment (configs/fashion_mnist_encoder_only.py) through train(): the
  decoder comes from a trained run (whose checkpoint spells list indices as strings) and stays
  bitwise as it was; the encoder starts fresh and trains."""
  source, target = str(tmp_path / "source"), str(tmp_path / "encoder_only")
  trainer.train(tiny_config(), source)
  decoder = ("decoder", "to_output")
  config = tiny_config(
    **{"init.params_from": source, "init.param_groups": decoder, "optimizer.frozen": decoder}
  )
  trainer.train(config, target)
  trained, fresh = (checkpoint_lib.trained_params(w) for w in (source, target))
  same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(*map(jax.tree.leaves, (a, b))))
  assert all(same(fresh[group], trained[group]) for group in decoder)
  assert not same(fresh["encoder"], trained["encoder"])


def test_the_encoder_only_config_builds_the_default_model():
  """Its decoder must fit the default run's checkpoint: the two configs' models are one."""
  assert (
    load_config("fashion_mnist_encoder_only").model.to_dict()
    == load_config("fashion_mnist_mlp").model.to_dict()
  )


def test_the_parameter_ema_warms_up_so_early_evaluations_are_not_the_initialisation():
  """ema_decay_at: 0.1 at the first update, the configured decay only once (1+t)/(10+t)
  reaches it; after the trainer's jitted step, the EMA is 0.1 initial + 0.9 updated."""
  assert float(step_lib.ema_decay_at(0, 0.999)) == pytest.approx(0.1)
  assert float(step_lib.ema_decay_at(1000, 0.999)) == pytest.approx(1001 / 1010)
  assert float(step_lib.ema_decay_at(10**6, 0.999)) == pytest.approx(0.999)
  config = tiny_config(
    num_steps=1,
    steps_per_dispatch=1,
    ema_decay=0.999,
    **{"eval.every_steps": 0, "checkpoint.every_steps": 0},
  )
  run = Run(config, array_dataset(64, 16))
  runner = parallel.Runner("shard_map", jax.devices()[:1])
  state = run.initial_state()
  before = [np.asarray(p) for p in jax.tree.leaves(state.params)]
  after = run.train_fn("one_step", runner=runner)(
    runner.put(state, "state"),
    runner.put(run.train_images[: config.batch_size], parallel.batch_axis(0)),
  )[0]
  for p0, p1, e in zip(before, jax.tree.leaves(after.params), jax.tree.leaves(after.ema_params)):
    np.testing.assert_allclose(e, 0.1 * p0 + 0.9 * p1, rtol=1e-5, atol=1e-6)
