"""The latent autoencoder's two players through `train()` itself: the autoencoder (L1 + KL +
LPIPS + the adversarial term) and the PatchGAN discriminator in one jitted step.

The same numbers on 1 device and on 8 (data-parallel and fsdp), exact resume after a
preemption on either side of the discriminator's start, and the one-line refusals. LPIPS runs
on random weights of VGG16's shapes (written to a temporary FLAXVAE_WEIGHTS_DIR): the step's
path is the same as with the published weights.
"""

import jax
import numpy as np
import pytest

from flaxvae import settings, weights
from flaxvae.errors import ConfigError, WeightsMissing
from flaxvae.objectives import perceptual
from flaxvae.run import Run
from flaxvae.runtime import backend
from flaxvae.train import outputs, preemption
from flaxvae.train import step as step_lib
from flaxvae.train.trainer import train
from tests import conftest
from tests.train.test_fault_tolerance import assert_bitwise, saved_state, stop_at
from tests.train.test_players import rounding_only

SHAPE = (28, 28, 1)
DATASET = conftest.array_dataset(32, 16, SHAPE)
NUM_STEPS, START = 6, 3  # the discriminator's loss reaches the autoencoder from step 3


@pytest.fixture(scope="module", autouse=True)
def lpips_weights(tmp_path_factory, compilation_cache):
  """Random LPIPS weights where the loaders look for the published ones."""
  directory = tmp_path_factory.mktemp("weights")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("FLAXVAE_WEIGHTS_DIR", str(directory))
    rng = np.random.default_rng(0)
    arrays = {
      key: rng.normal(0.0, 0.05, shape).astype(np.float32)
      if "vgg16" in key
      # lpips' heads are non-negative (a 1x1 convolution of squared differences)
      else rng.uniform(0.0, 0.1, shape).astype(np.float32)
      for key, shape in perceptual.weight_shapes().items()
    }
    weights.save(perceptual.NAME, arrays, weights.weights_path(perceptual.NAME))
    yield directory


def two_players(**changes):
  """configs/fashion_mnist_kl_f4.py's tiny variant: both players, both sides of the start."""
  config = conftest.load_config("fashion_mnist_kl_f4", "tiny")
  return conftest.set_keys(
    config,
    **{
      "num_steps": NUM_STEPS,
      "log_every_steps": 1,
      "batch_size": 8,
      "adversary.start_step": START,
      "adversary.train_start": 1,  # the discriminator trains two steps before its loss is used
      "checkpoint.every_steps": 100,
      "eval.final_num_examples": 8,
      **changes,
    },
  )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("eight")
  train(two_players(), str(workdir), DATASET)
  return workdir


def test_both_players_train_and_log_their_terms(reference):
  rows = [r for r in outputs.read_metrics(str(reference)) if "disc_loss" in r]
  assert [r["step"] for r in rows] == list(range(1, NUM_STEPS + 1))
  before, after = rows[START - 1], rows[START]  # steps START and START + 1
  assert rows[0]["disc_loss"] == 0.0 and rows[1]["disc_loss"] > 0.0  # trains from step 1
  assert before["adaptive_weight"] == 0.0 and after["adaptive_weight"] > 0.0
  for row in rows:
    assert all(np.isfinite(v) for v in row.values() if isinstance(v, float)), row
  state = saved_state(reference, NUM_STEPS)
  assert int(state["adversary"]["skipped"]) == 0 and int(state["skipped"]) == 0


def test_the_steps_before_the_discriminator_starts_dispatch_to_the_waiting_program(monkeypatch):
  """On XLA:CPU a dispatch that ends by the first active step (adversary.train_start = 1 here)
  runs the program without the discriminator's branches; accelerators keep one program."""
  train_fn = Run(two_players(), DATASET).train_fn("indices")
  assert step_lib.program_for(train_fn, 0, 1) is train_fn.waiting
  assert step_lib.program_for(train_fn, 0, 2) is train_fn and train_fn.first_active_step == 1
  assert step_lib.program_for(train_fn, 1, 1) is train_fn
  monkeypatch.setattr(backend, "separate_waiting_program", lambda: False)
  assert not isinstance(Run(two_players(), DATASET).train_fn(), step_lib.WithWaitingProgram)


@pytest.mark.slow
def test_before_the_discriminator_starts_the_waiting_program_gives_the_full_programs_numbers(
  reference, tmp_path, monkeypatch
):
  """The reference run dispatched step 0 to the waiting program; with only the full program
  (as accelerators run it) the run's every number is the same, bitwise."""
  monkeypatch.setattr(backend, "separate_waiting_program", lambda: False)
  train(two_players(), str(tmp_path), DATASET)
  assert_bitwise(saved_state(tmp_path, NUM_STEPS), saved_state(reference, NUM_STEPS))
  timing = ("wall_s", "examples_per_s")
  rows = lambda workdir: [
    {k: v for k, v in r.items() if k not in timing}
    for r in outputs.read_metrics(str(workdir))
    if "disc_loss" in r
  ]
  assert rows(tmp_path) == rows(reference) and len(rows(reference)) == NUM_STEPS


# Adam's first updates are lr * g / |g|: where a gradient is rounding noise (an attention key's
# bias, whose gradient softmax cancels; elements the per-device batch sums in another order),
# its sign, and so a whole lr-sized step, follows the summation order, which changes with the
# per-device batch; the adaptive weight, a ratio with the small norm of the adversarial
# gradient, then passes the difference on. eps=1 keeps such updates as small as their
# gradients, so the comparison sees how the step reduces over devices, not the sign of rounding.
COMPARED_STEPS = 5
LINEAR_SMALL_UPDATES = {
  "optimizer.eps": 1.0,
  "adversary.optimizer.eps": 1.0,
  "num_steps": COMPARED_STEPS,
}
COMPARED = ("loss", "distortion", "perceptual", "rate", "grad_norm", "adaptive_weight")
COMPARED += ("generator_loss", "disc_loss", "disc_grad_norm")


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [{}, {"parallel.mesh": "data:2,fsdp:4"}], ids=["data", "fsdp"])
def test_eight_devices_give_the_numbers_of_one(tmp_path, mesh):
  one, eight = tmp_path / "one", tmp_path / "eight"
  train(two_players(**LINEAR_SMALL_UPDATES, **{"parallel.num_devices": 1}), str(one), DATASET)
  train(two_players(**LINEAR_SMALL_UPDATES, **mesh), str(eight), DATASET)
  rows = [[r for r in outputs.read_metrics(str(w)) if "disc_loss" in r] for w in (one, eight)]
  steps = list(range(1, COMPARED_STEPS + 1))
  assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]] == steps
  for a, b in zip(*rows):  # both sides of the start: the discriminator's loss reaches step 4
    for key in COMPARED:
      # rows are logged to 6 decimals: a near-zero term (the generator loss) differs by that
      np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5, err_msg=f"{key} {a}")
  a, b = saved_state(one, COMPARED_STEPS), saved_state(eight, COMPARED_STEPS)
  for part in ("params", "adversary"):
    for (path, x), y in zip(jax.tree.leaves_with_path(a[part]), jax.tree.leaves(b[part])):
      if rounding_only(path):
        continue
      np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-5, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
@pytest.mark.parametrize("stop", [START - 1, START + 1], ids=["before_start", "after_start"])
def test_a_preempted_run_resumes_bitwise_on_either_side_of_the_start(reference, tmp_path, stop):
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(preemption.Watcher, "should_stop", stop_at(stop))
    with pytest.raises(preemption.Preempted):
      train(two_players(), str(tmp_path), DATASET)
  train(two_players(), str(tmp_path), DATASET)
  assert_bitwise(saved_state(tmp_path, NUM_STEPS), saved_state(reference, NUM_STEPS))


def test_a_discriminator_setting_without_a_discriminator_is_refused():
  config = conftest.load_config("fashion_mnist_kl_f4", "lpips")
  with pytest.raises(ConfigError, match=r"adversary\.width is set but adversary\.name is 'none'"):
    settings.resolve(conftest.set_keys(config, **{"adversary.width": 16}))


def test_the_perceptual_term_needs_a_model_that_reconstructs():
  config = conftest.tiny_config(**{"objective.perceptual_weight": 1.0})
  with pytest.raises(ConfigError, match="reconstruction capability"):
    settings.resolve(config)


def test_lpips_without_its_weights_is_one_line_before_anything_is_written(tmp_path, monkeypatch):
  monkeypatch.setenv("FLAXVAE_WEIGHTS_DIR", str(tmp_path / "empty"))
  with pytest.raises(WeightsMissing, match="flaxvae weights prepare lpips_vgg16") as e:
    train(two_players(), str(tmp_path / "run"), DATASET)
  assert "\n" not in str(e.value)
  assert not (tmp_path / "run").exists()


def test_an_image_size_the_downsampling_does_not_divide_is_refused(tmp_path):
  config = two_players(**{"model.pad_to": 0})  # 28 is not divisible by 8 (three levels)
  config.model.channel_multipliers = (1, 2, 2, 2)
  with pytest.raises(ConfigError, match="downsamples by 8 .* but the image is 28x28"):
    train(config, str(tmp_path), DATASET)
  assert not tmp_path.joinpath("checkpoints").exists()


def test_the_step_config_takes_the_perceptual_weight_and_the_adversary_from_their_settings():

  run = Run(two_players(**{"objective.perceptual_weight": 0.25}), DATASET)
  assert run.step_cfg.perceptual_weight == 0.25
  assert run.step_cfg.adversary.start_step == START and run.step_cfg.adversary.train_start == 1
  assert run.step_cfg.adversary.loss == "hinge" and run.step_cfg.adversary.weight == 0.5


@pytest.mark.slow
@pytest.mark.parametrize(
  "name, shape",
  [
    ("fashion_mnist_kl_f4", SHAPE),
    ("imagenet256_kl_f8", (256, 256, 3)),
    ("kl_f8c16", (256, 256, 3)),
  ],
)
def test_every_shipped_autoencoder_config_trains_two_steps_on_data_of_its_shape(
  name, shape, tmp_path
):
  """get_config("tiny"): the config's own structure (levels, latent channels, quant convs,
  LPIPS, the discriminator on both sides of its start) on random images of its shape."""
  config = conftest.set_keys(conftest.load_config(name, "tiny"), **{"eval.rfid_examples": 0})
  dataset = conftest.array_dataset(16, 8, shape)
  row = train(config, str(tmp_path), dataset)
  assert np.isfinite(row["elbo"]) and np.isfinite(row["psnr"]) and np.isfinite(row["lpips"])
  last = [r for r in outputs.read_metrics(str(tmp_path)) if "disc_loss" in r][-1]
  assert last["adaptive_weight"] > 0.0 and last["disc_loss"] > 0.0
