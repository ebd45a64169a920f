"""The evaluation row: diagnostics a model lacks the capability for are skipped (and said so),
per-layer figures come per layer, and NLL / bits per dim appear only where log p(x) is a
log-likelihood of the scored data (protocol and likelihood agree)."""

import dataclasses
import math

import numpy as np
import pytest

from flaxvae.data import protocols
from flaxvae.eval import diagnostics, evaluation
from flaxvae.eval.evaluator import Evaluator
from flaxvae.eval.evaluators import EVALUATORS
from flaxvae.objectives.likelihoods import get_likelihood
from flaxvae.run import Run
from flaxvae.runtime import backend
from tests.conftest import array_dataset, tiny_config

SHAPE = (8, 8, 1)  # small images: these tests are about the row, not the figures
DIMS = math.prod(SHAPE)


def run_and_evaluator(config):
  run = Run(config, array_dataset(train=32, test=16, shape=SHAPE))
  return run, Evaluator(run.runner, run.eval_images, config.eval.batch_size)


def final_row(config):
  run, evaluator = run_and_evaluator(config)
  return evaluation.final_evaluation(run, evaluator, run.params, evaluation.eval_rng(config.seed))


def test_a_model_without_the_capabilities_skips_those_diagnostics_and_says_why():
  config = tiny_config(
    "ladder_mlp", **{"eval.amortization_examples": 4, "eval.amortization_steps": 2}
  )
  run, evaluator = run_and_evaluator(config)
  rng = evaluation.eval_rng(config.seed)
  row = evaluation.final_evaluation(run, evaluator, run.params, rng)
  assert set(row["skipped"]) - {"khat"} == {"elbo_surgery", "amortization_gap"}
  assert "aggregate_posterior" in row["skipped"]["elbo_surgery"]
  assert "local_posterior" in row["skipped"]["amortization_gap"]
  assert all("'ladder_mlp'" in why for name, why in row["skipped"].items() if name != "khat")
  for key in (
    "mutual_info",
    "marginal_kl",
    "amortization_gap",
    "approximation_gap",
    "amortization_examples",
  ):
    assert key not in row, key  # skipped, never reported as zero
  # What it can give, it gives, per layer (top first: latent_dims (4, 2) -> 2 units, then 4).
  assert len(row["rate_by_layer"]) == 2 == len(row["rate_by_layer_stderr"])
  assert sum(row["rate_by_layer"]) == pytest.approx(row["rate"], rel=1e-5)
  assert len(row["active_units_by_layer"]) == 2
  top, bottom = row["active_units_by_layer"]
  assert 0 <= top <= 2 and 0 <= bottom <= 4 and row["active_units"] == top + bottom
  assert row["log_px"] >= row["elbo"] and row["num_examples"] == 16
  assert evaluation.format_table(row)  # lists and the skipped dict do not break the table
  # The periodic evaluation has no amortization gap to skip; ELBO surgery it skips too.
  periodic = evaluation.periodic_evaluation(run, evaluator, run.params, rng)
  assert set(periodic["skipped"]) - {"khat"} == {"elbo_surgery"}
  assert len(periodic["rate_by_layer"]) == 2 == len(periodic["active_units_by_layer"])


def test_a_replaced_eval_section_runs_ais_and_leaves_the_run_settings_as_they_are():
  """What `flaxvae evaluate --log_px_estimator=ais` does: no config is written to."""
  run, evaluator = run_and_evaluator(
    tiny_config(**{"eval.ais_steps": 2, "eval.ais_chains": 1, "eval.ais_examples": 4})
  )
  ais = dataclasses.replace(run.settings.eval, log_px_estimator="ais")
  row = evaluation.final_evaluation(
    run, evaluator, run.params, evaluation.eval_rng(run.settings.seed), eval_settings=ais
  )
  assert row["log_px_estimator"] == "ais" and row["ais_examples"] == 4
  assert run.settings.eval.log_px_estimator == "iwae"


def test_a_model_with_the_capabilities_skips_nothing():
  config = tiny_config("mlp", **{"eval.amortization_examples": 4, "eval.amortization_steps": 2})
  row = final_row(config)
  assert set(row.get("skipped", {})) <= {"khat"}  # k-hat needs K > 20
  for key in ("mutual_info", "marginal_kl", "amortization_gap", "approximation_gap"):
    assert key in row and key + "_stderr" in row, key
  assert row["amortization_examples"] == 4
  assert len(row["rate_by_layer"]) == 1 == len(row["active_units_by_layer"])


def test_grey_levels_under_bernoulli_are_not_a_probability_model():
  row = final_row(tiny_config("mlp", **{"data.protocol": "grey"}))
  assert row["protocol"] == "grey" and row["likelihood"] == "bernoulli"
  assert row["is_probability_model"] is False
  for key in ("nll", "nll_stderr", "bits_per_dim", "bits_per_dim_stderr", "elbo_bits_per_dim"):
    assert key not in row, key
  assert "not a probability model of grey data" in row["note"]
  assert "data.protocol=binarized" in row["note"]
  assert "log_px" in row and "elbo" in row  # the bounds are still there, labelled


def test_binarized_bernoulli_is_a_probability_model_with_bits_per_dim():
  row = final_row(tiny_config("mlp", **{"data.protocol": "binarized"}))
  assert row["protocol"] == "binarized" and row["is_probability_model"] is True
  assert "note" not in row
  assert row["nll"] == pytest.approx(-row["log_px"])
  assert row["bits_per_dim"] == pytest.approx(row["nll"] / (DIMS * math.log(2)))
  assert row["bits_per_dim_stderr"] == pytest.approx(row["nll_stderr"] / (DIMS * math.log(2)))
  assert row["elbo_bits_per_dim"] == pytest.approx(-row["elbo"] / (DIMS * math.log(2)))
  assert row["elbo_bits_per_dim"] >= row["bits_per_dim"]


@pytest.mark.parametrize(
  "protocol, likelihood, expected",
  [
    ("grey", "bernoulli", False),
    ("binarized", "bernoulli", True),
    ("static_binarized", "bernoulli", True),
    ("8bit", "bernoulli", False),
    ("8bit", "discretized_logistic", True),
    ("8bit", "mixture_logistic", True),
    ("grey", "discretized_logistic", False),
    ("binarized", "discretized_logistic", False),
    ("8bit", "gaussian", False),
    ("binarized", "gaussian", False),
  ],
)
def test_which_protocol_and_likelihood_make_a_probability_model(protocol, likelihood, expected):
  assert (
    protocols.is_probability_model(protocols.PROTOCOLS.get(protocol), get_likelihood(likelihood))
    is expected
  )


def test_the_note_says_what_the_figures_are_instead():
  grey = protocols.PROTOCOLS.get("grey")
  note = evaluation.likelihood_note(grey, get_likelihood("gaussian"))
  assert "density" in note
  note = evaluation.likelihood_note(grey, get_likelihood("discretized_logistic"))
  assert "data.protocol=8bit" in note


def test_summarize_gives_means_and_standard_errors_per_layer():
  values = {"a": np.array([1.0, 2.0, 3.0]), "b": np.array([[1.0, 0.0], [3.0, 0.0]])}
  row = evaluation.summarize(values)
  assert row["a"] == pytest.approx(2.0) and row["a_stderr"] == pytest.approx(1 / math.sqrt(3))
  assert row["b"] == [2.0, 0.0] and row["b_stderr"] == pytest.approx([1.0, 0.0])
  one = evaluation.summarize({"a": np.array([5.0])})
  assert one == {"a": 5.0, "a_stderr": 0.0}


def test_the_optional_diagnostics_run_in_their_registered_order():
  """AIS comes before the amortization gap, which compares against its log p(x)."""
  assert [name for name, _ in EVALUATORS.items()] == [
    "elbo_surgery",
    "ais",
    "bdmc",
    "amortization_gap",
    "reconstruction",
  ]


def test_host_dispatched_chunks_give_the_scanned_figures_from_one_running_total():
  """Convolutional models on XLA:CPU get their importance samples in chunks dispatched from the
  host, each merged into one running total per batch on the device (it used to keep every
  chunk's output until the end: memory grew with K, 29 MB a sample for the VDVAE). A request
  for fewer examples than a batch gets a batch of their size (no padding rows computed)."""
  config = tiny_config("conv", **{"data.protocol": "binarized"})
  run, evaluator = run_and_evaluator(config)
  assert backend.host_chunk_rows("conv") and evaluator.batch_size == 16
  assert run.runner.num_devices == 8  # tests run on 8 simulated devices
  assert [evaluator.batch_for(n) for n in (1, 5, 9, 100)] == [8, 8, 16, 16]
  rng, k, n = evaluation.eval_rng(config.seed), 30, 5
  traced = []
  real_merge = diagnostics.merge_chunk
  with pytest.MonkeyPatch.context() as patch:  # the merge is jitted once, then run per chunk
    # one row per device: chunks of 7 samples, the last one padded
    patch.setitem(backend.HOST_CHUNK_ROWS_ON_CPU, "conv", 7)
    patch.setattr(diagnostics, "merge_chunk", lambda *a: traced.append(1) or real_merge(*a))
    chunked = evaluation.importance_values(run, evaluator, run.params, rng, n, k, None)
  scanned = evaluator.per_example(
    f"importance_{k}", diagnostics.importance_fn(run.graphdef, run.protocol, k), run.params, rng, n
  )
  for key in ("log_px", "elbo", "rate", "distortion", "khat"):
    np.testing.assert_allclose(chunked[key], scanned[key], rtol=2e-5, atol=2e-4, err_msg=key)
  assert traced == [1]
