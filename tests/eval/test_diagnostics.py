"""Diagnostics against closed forms (a linear-Gaussian VAE), and on a briefly trained MLP VAE."""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flaxvae
from flaxvae import cli, defaults, settings
from flaxvae import data as data_lib
from flaxvae.data import folder, protocols
from flaxvae.eval import diagnostics, evaluation
from flaxvae.eval.evaluator import Evaluator
from flaxvae.models.gaussian_latent import GaussianLatentVAE
from flaxvae.models.ladder import LadderMLPVAE
from flaxvae.models.registry import MODELS
from flaxvae.objectives import gaussian
from flaxvae.objectives.likelihoods import get_likelihood
from flaxvae.run import Run
from flaxvae.train import trainer
from tests.conftest import set_keys

LATENT, SIDE, OBS_LOGVAR = 3, 4, math.log(0.5)
DIMS = SIDE * SIDE


@MODELS.register("linear")
class LinearVAE(GaussianLatentVAE):
  """Linear encoder with a shared diagonal variance; linear decoder (probabilistic PCA with a
  fixed-variance Gaussian likelihood)."""

  def __init__(self, *, image_shape, likelihood, rngs, dtype=jnp.float32, latent_dim=LATENT):
    height, width, colors = image_shape
    dims = math.prod(image_shape)
    self.image_shape, self.likelihood, self.latent_dim = image_shape, likelihood, latent_dim
    self.raw_shape = (height, width, likelihood.channels_out(colors))
    self.enc = nnx.Linear(dims, latent_dim, rngs=rngs)
    self.q_logvar = nnx.Param(jnp.zeros((latent_dim,)))
    self.dec = nnx.Linear(latent_dim, math.prod(self.raw_shape), rngs=rngs)

  def encode(self, x):
    mean = self.enc(x.reshape(x.shape[0], -1))
    return mean, jnp.broadcast_to(self.q_logvar[...], mean.shape)

  def decode(self, z):
    return self.dec(z).reshape(z.shape[0], *self.raw_shape)


def images(n, seed, side=SIDE):
  return np.random.default_rng(seed).integers(0, 256, (n, side, side, 1), dtype=np.uint8)


@pytest.fixture(scope="module")
def linear():
  """A linear-Gaussian run whose encoder is near, but not at, the exact posterior."""
  splits = {"train": images(64, 0), "test": images(64, 1)}
  config = defaults.base_config()
  config.model = defaults.model_config("linear", latent_dim=LATENT)
  config.objective.likelihood, config.objective.gaussian_logvar = "gaussian", OBS_LOGVAR
  config.data.protocol = "grey"  # x = k / 255, scored by the Gaussian density
  config.batch_size, config.eval.batch_size = 16, 32
  run = Run(config, data_lib.ArrayDataset(splits))
  params = jax.tree.map(np.asarray, run.params)
  w, c = params["dec"]["kernel"].astype(np.float64), params["dec"]["bias"].astype(np.float64)
  var = math.exp(OBS_LOGVAR)
  precision = np.eye(LATENT) + w @ w.T / var
  posterior_cov = np.linalg.inv(precision)
  # Exact posterior mean map, perturbed; posterior variances, widened.
  kernel = (posterior_cov @ w / var).T
  rng = np.random.default_rng(0)
  params["enc"]["kernel"] = (kernel + 0.1 * rng.normal(size=kernel.shape)).astype(np.float32)
  params["enc"]["bias"] = (-c @ kernel + 0.1).astype(np.float32)
  params["q_logvar"] = (np.log(np.diag(posterior_cov)) + 0.4).astype(np.float32)
  x = splits["test"].reshape(64, -1) / 255.0
  exact_log_px = np.array([_log_normal_full(xi, c, w.T @ w + var * np.eye(DIMS)) for xi in x])
  q_mean = x @ params["enc"]["kernel"] + params["enc"]["bias"]
  q_var = np.exp(params["q_logvar"]).astype(np.float64)
  post_mean = (x - c) @ (posterior_cov @ w / var).T
  exact_kl = np.array(
    [_kl_diag_to_full(m, q_var, mu, precision) for m, mu in zip(q_mean, post_mean)]
  )
  optimal_kl = 0.5 * (np.sum(np.log(np.diag(precision))) - np.linalg.slogdet(precision)[1])
  evaluator = Evaluator(run.runner, splits["test"], config.eval.batch_size)
  return dict(
    run=run,
    params=params,
    evaluator=evaluator,
    exact_log_px=exact_log_px,
    exact_kl=exact_kl,
    optimal_kl=optimal_kl,
    q_mean=q_mean,
  )


def _log_normal_full(x, mean, cov):
  d = x - mean
  return -0.5 * (
    len(x) * math.log(2 * math.pi) + np.linalg.slogdet(cov)[1] + d @ np.linalg.solve(cov, d)
  )


def _kl_diag_to_full(m, v, mu, precision):
  """KL(N(m, diag v) || N(mu, precision^-1))."""
  d = mu - m
  return 0.5 * (
    np.sum(np.diag(precision) * v)
    + d @ precision @ d
    - len(m)
    - np.linalg.slogdet(precision)[1]
    - np.sum(np.log(v))
  )


def importance(setup, k):
  run = setup["run"]
  fn = diagnostics.importance_fn(run.graphdef, run.protocol, k)
  return setup["evaluator"].per_example(
    f"importance_{k}", fn, setup["params"], evaluation.eval_rng(run.settings.seed)
  )


def test_log_px_converges_to_the_exact_marginal_and_the_gap_to_the_exact_kl(linear):
  errors = []
  for k in (1, 10, 100, 1000):
    values = importance(linear, k)
    errors.append(float(np.mean(linear["exact_log_px"] - values["log_px"])))
    assert np.all(values["log_px"] >= values["elbo"] - 1e-4)
    np.testing.assert_allclose(
      values["inference_gap"], values["log_px"] - values["elbo"], rtol=1e-6, atol=1e-6
    )
  assert errors[0] > errors[1] > errors[3] > -0.01, errors
  assert abs(errors[3]) < 0.02, errors
  np.testing.assert_allclose(values["log_px"], linear["exact_log_px"], atol=0.3)
  # K = 1000: the inference gap is the exact KL(q(z|x) || p(z|x)) of this encoder.
  assert np.mean(linear["exact_kl"]) > 0.3
  np.testing.assert_allclose(
    np.mean(values["inference_gap"]), np.mean(linear["exact_kl"]), atol=0.03
  )
  np.testing.assert_allclose(values["inference_gap"], linear["exact_kl"], atol=0.3)


def test_importance_pass_reports_rate_distortion_and_posterior_means(linear):
  """The one-layer figures beside log p(x): the analytic rate of the Gaussian q, a distortion
  that completes the K-sample ELBO up to Monte Carlo error, and E_q[z] for active units."""
  values = importance(linear, 1000)
  q_var = np.exp(linear["params"]["q_logvar"])
  rate = np.asarray(gaussian.kl_to_standard(linear["q_mean"], np.log(q_var)[None]))
  assert values["rate_by_layer"].shape == (64, 1)
  np.testing.assert_allclose(values["rate"], rate, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(values["rate_by_layer"][:, 0], values["rate"], rtol=1e-6)
  np.testing.assert_allclose(
    np.mean(-values["distortion"] - values["rate"]), np.mean(values["elbo"]), atol=0.05
  )
  np.testing.assert_allclose(values["q_mean_0"], linear["q_mean"], rtol=1e-4, atol=1e-4)
  assert values["khat"].shape == (64,) and np.all(np.isfinite(values["khat"]))


@pytest.mark.parametrize("model", ["linear", "ladder"])
def test_chunking_does_not_change_the_estimate(model):
  """The same K draws whatever the chunk size (7 does not divide 50: a padded last chunk), for
  one layer and for two (noise is keyed by example, sample and layer); and the first K draws of
  a larger K are the same draws."""
  key = jax.random.key(3)
  x = (jax.random.uniform(key, (5, 2, 3, 1)) > 0.5).astype(jnp.float32)
  likelihood = get_likelihood("bernoulli")
  if model == "linear":
    net = LinearVAE(image_shape=(2, 3, 1), likelihood=likelihood, rngs=nnx.Rngs(0), latent_dim=2)
  else:
    net = LadderMLPVAE(
      image_shape=(2, 3, 1),
      likelihood=likelihood,
      rngs=nnx.Rngs(0),
      hidden=((8,), (4,)),
      latent_dims=(3, 2),
    )
  keys = jax.random.split(key, 5)
  terms_of = lambda noise: net.terms(x, noise)
  run = jax.jit(
    lambda k, c: diagnostics.importance_pass(terms_of, x, keys, k, c, keep_log_w=True),
    static_argnums=(0, 1),
  )
  runs = [run(50, chunk) for chunk in (7, 50)]
  for other in runs[1:]:
    for name in ("iwae", "elbo", "distortion", "rate_by_layer", "log_w"):
      np.testing.assert_allclose(
        np.asarray(other[name]), np.asarray(runs[0][name]), rtol=1e-5, atol=1e-5, err_msg=name
      )
    for mine, theirs in zip(other["q_mean"], runs[0]["q_mean"]):
      np.testing.assert_allclose(np.asarray(mine), np.asarray(theirs), rtol=1e-5, atol=1e-5)
  assert runs[0]["log_w"].shape == (50, 5)
  assert runs[0]["rate_by_layer"].shape == (5, 1 if model == "linear" else 2)
  np.testing.assert_allclose(
    np.asarray(runs[0]["iwae"]), jax.nn.logsumexp(runs[0]["log_w"], 0) - math.log(50), rtol=1e-5
  )
  np.testing.assert_allclose(
    np.asarray(runs[0]["elbo"]), np.mean(runs[0]["log_w"], 0), rtol=1e-5, atol=1e-5
  )
  if model == "linear":  # the noise is keyed the same way for every layer: one model suffices
    np.testing.assert_allclose(
      np.asarray(run(20, 7)["log_w"]), np.asarray(runs[0]["log_w"][:20]), rtol=1e-5, atol=1e-5
    )


def test_amortization_gap_matches_the_best_diagonal_gaussian(linear):
  run = linear["run"]
  fn = diagnostics.amortization_fn(run.graphdef, run.protocol, 300, 0.05, num_eval_samples=500)
  gaps = linear["evaluator"].per_example(
    "amortization", fn, linear["params"], evaluation.eval_rng(run.settings.seed)
  )
  exact = linear["exact_kl"] - linear["optimal_kl"]  # KL(q || p(z|x)) - KL(q* || p(z|x))
  np.testing.assert_allclose(
    np.mean(gaps["elbo_optimized"] - gaps["elbo_encoder"]), np.mean(exact), atol=0.05
  )


def test_elbo_surgery_adds_up_and_matches_the_gaussian_closed_form(linear):
  """Gaussian data and a linear encoder: q(z) is Gaussian, so I(x;z) and KL(q(z)||p(z)) are
  known."""
  n, latent, data_dims = 4000, 2, 3
  rng = np.random.default_rng(1)
  a = rng.normal(size=(data_dims, latent)) * 0.7
  q_var = np.array([0.3, 0.6])
  x = rng.normal(size=(n, data_dims))
  means, logvars = (
    (x @ a + 0.2).astype(np.float32),
    np.tile(np.log(q_var), (n, 1)).astype(np.float32),
  )
  evaluator = Evaluator(linear["run"].runner, x, 1000)
  values = evaluator.per_example(
    "aggregate",
    diagnostics.aggregate_fn(num_samples=8),
    (means, logvars),
    evaluation.eval_rng(linear["run"].settings.seed),
    rows=np.stack([means, logvars], axis=1),
  )
  rate = np.asarray(gaussian.kl_to_standard(means, logvars))
  np.testing.assert_allclose(
    values["mutual_info"] + values["marginal_kl"], rate, rtol=1e-5, atol=1e-4
  )
  agg_cov = a.T @ a + np.diag(q_var)
  exact_mi = 0.5 * (np.linalg.slogdet(agg_cov)[1] - np.sum(np.log(q_var)))
  agg_mean = np.full(latent, 0.2)
  exact_marginal_kl = 0.5 * (
    np.trace(agg_cov) + agg_mean @ agg_mean - latent - np.linalg.slogdet(agg_cov)[1]
  )
  assert abs(np.mean(values["mutual_info"]) - exact_mi) < 0.05, (
    np.mean(values["mutual_info"]),
    exact_mi,
  )
  assert abs(np.mean(values["marginal_kl"]) - exact_marginal_kl) < 0.05


def test_log_mixture_density_matches_direct_sum():
  rng = np.random.default_rng(2)
  means, logvars = rng.normal(size=(37, 2)), 0.3 * rng.normal(size=(37, 2))
  z = rng.normal(size=(5, 2))
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  got = diagnostics.log_mixture_density(
    f32(z), f32(means), f32(logvars), chunk=8
  )  # 5 chunks, padded
  var = np.exp(logvars)
  comp = -0.5 * np.sum(
    np.log(2 * np.pi * var)[None] + (z[:, None] - means[None]) ** 2 / var[None], -1
  )
  want = np.log(np.mean(np.exp(comp), axis=1))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_active_units_counts_units_that_vary_with_x():
  rng = np.random.default_rng(0)
  means = np.stack([rng.normal(size=500), 0.01 * rng.normal(size=500), 2 * rng.normal(size=500)], 1)
  count, stderr = diagnostics.active_units(means)
  assert count == 2 and stderr == 0.0  # every bootstrap resample agrees: far from the threshold
  assert diagnostics.active_units(means[:1]) == (0, 0.0)


# ----------------------------------------------------------------------------
# A briefly trained MLP VAE: training writes the diagnostics, the API and CLI read them.
# ----------------------------------------------------------------------------
def structured_images(n, seed):
  """Images driven by a 2-d latent, so a VAE has something to encode."""
  rng = np.random.default_rng(seed)
  basis = np.random.default_rng(99).normal(size=(2, 64))
  return (
    (255 / (1 + np.exp(-rng.normal(size=(n, 2)) @ basis * 2))).astype(np.uint8).reshape(n, 8, 8, 1)
  )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, compilation_cache):
  """200 steps on structured 8x8 images, binarized (Bernoulli is then a probability model).

  Training takes its data in memory; the same splits are also prepared on disk (by the real
  folder converter) as the dataset the config names, which `flaxvae evaluate` and
  `load_dataset` read after training.
  """
  root = tmp_path_factory.mktemp("structured")
  source = root / "source"
  source.mkdir()
  np.save(source / "images.npy", structured_images(576, 0))
  folder.prepare_folder(
    str(source), "structured", test_fraction=64 / 576, data_dir=str(root / "tfds")
  )
  config = defaults.base_config()
  config.model = defaults.model_config("mlp", hidden=(32,), latent_dim=4)
  config.data.name, config.data.data_dir = "structured", str(root / "tfds")
  config.data.protocol = "binarized"
  on_disk = data_lib.PreparedDataset(config.data)
  splits = {split: on_disk.images(split) for split in ("train", "test")}
  assert splits["train"].shape == (512, 8, 8, 1) and splits["test"].shape == (64, 8, 8, 1)
  config.batch_size, config.num_steps, config.steps_per_dispatch = 32, 200, 100
  config.log_every_steps = config.eval.every_steps = config.checkpoint.every_steps = 100
  config.eval.batch_size, config.eval.num_examples, config.eval.num_importance_samples = 64, 32, 10
  config.eval.final_num_importance_samples = 10  # the periodic compilation serves both
  config.eval.final_num_examples = 48
  config.eval.amortization_examples, config.eval.amortization_steps = 16, 20
  workdir = str(tmp_path_factory.mktemp("trained"))
  final = trainer.train(config, workdir, data_lib.ArrayDataset(splits, name="structured"))
  return dict(
    workdir=workdir, final=final, model=flaxvae.load(workdir), splits=splits, config=config
  )


def test_training_writes_periodic_and_final_diagnostics(trained):
  rows = [json.loads(line) for line in open(os.path.join(trained["workdir"], "metrics.jsonl"))]
  evals = [r for r in rows if r["split"] == "test"]
  assert [r["step"] for r in evals] == [100, 200] and [r["final"] for r in evals] == [False, True]
  assert evals[0]["num_examples"] == 32 and evals[1]["num_examples"] == 48
  with open(os.path.join(trained["workdir"], evaluation.FINAL_FILE)) as f:
    result = json.load(f)
  for key in (
    "elbo",
    "rate",
    "distortion",
    "log_px",
    "nll",
    "bits_per_dim",
    "inference_gap",
    "mutual_info",
    "marginal_kl",
    "active_units",
    "amortization_gap",
    "approximation_gap",
  ):
    assert key in result and key + "_stderr" in result, key
  assert result["num_examples"] == 48 and result["log_px"] >= result["elbo"]
  assert result["amortization_examples"] == 16
  assert result["mutual_info"] + result["marginal_kl"] == pytest.approx(result["rate"], abs=1e-3)
  assert result["nll"] == pytest.approx(-result["log_px"])
  assert result["bits_per_dim"] == pytest.approx(result["nll"] / (64 * math.log(2)))
  assert result["protocol"] == "binarized" and result["likelihood"] == "bernoulli"
  assert result["is_probability_model"] is True and "note" not in result
  assert set(result.get("skipped", {})) <= {
    "khat"
  }  # the MLP has every capability; k-hat needs K > 20
  assert len(result["rate_by_layer"]) == 1 == len(result["active_units_by_layer"])
  assert result["rate_by_layer"][0] == pytest.approx(result["rate"], rel=1e-5)
  assert result["active_units_by_layer"][0] == result["active_units"] <= 4
  assert "khat_mean" not in result and "at least 21" in result["skipped"]["khat"]  # K = 10
  assert result["step"] == 200 and result["split"] == "test"
  assert trained["final"]["log_px"] == pytest.approx(result["log_px"])


def test_log_px_bounds_the_elbo_and_grows_with_k(trained):
  model = trained["model"]
  x = trained["splits"]["test"]  # uint8: the API applies the run's protocol
  key = jax.random.key(0)
  means = []
  for k in (1, 10, 100, 1000):
    log_px, elbo = np.asarray(model.log_marginal(x, key, k)), np.asarray(model.elbo(x, key, k))
    assert log_px.shape == elbo.shape == (64,)
    assert np.all(log_px >= elbo - 1e-4)
    means.append(log_px.mean())
  # E[IWAE_K] grows with K; once the gap is closed, the means may tie within Monte Carlo noise.
  assert all(later > earlier - 0.02 for earlier, later in zip(means, means[1:])), means
  assert means[3] > means[0] + 0.1, means


def test_api_shapes(trained):
  model, x = trained["model"], trained["splits"]["test"][:5]
  assert model.step == 200 and model.latent_shapes == ((4,),)
  mean, logvar = model.encode(x)
  assert mean.shape == logvar.shape == (5, 4)
  assert model.decode(mean).shape == (5, 8, 8, 1)  # Bernoulli: one logit per channel
  assert model.log_likelihood(x, mean).shape == (5,) and model.log_prior(mean).shape == (5,)
  np.testing.assert_allclose(
    model.log_joint(x, (mean,)), model.log_likelihood(x, mean) + model.log_prior(mean), rtol=1e-5
  )
  assert model.sample(jax.random.key(1), 3).shape == (3, 8, 8, 1)
  assert model.reconstruct(x, jax.random.key(2)).shape == (5, 8, 8, 1)
  expected = protocols.eval_targets(
    trained["splits"]["test"], np.arange(64), protocols.PROTOCOLS.get("binarized")
  )
  np.testing.assert_array_equal(flaxvae.load_dataset(trained["workdir"], "test"), expected)


def test_cli_evaluate_ad_hoc_writes_its_own_file_and_report(trained, capsys):
  workdir = trained["workdir"]
  final_path = os.path.join(workdir, evaluation.FINAL_FILE)
  with open(final_path) as f:
    final_before = f.read()
  assert (
    cli.main(
      [
        "flaxvae",
        "evaluate",
        "--workdir",
        workdir,
        "--num_importance_samples",
        "10",
        "--max_examples",
        "32",
      ]
    )
    == 0
  )
  out = capsys.readouterr().out
  ad_hoc = os.path.join(workdir, "eval_test_K10_N32.json")
  assert f"written: {ad_hoc}" in out and "log_px" in out
  with open(ad_hoc) as f:
    row = json.load(f)
  assert row["num_examples"] == 32 and row["num_importance_samples"] == 10
  assert row["step"] == 200 and row["split"] == "test"
  with open(final_path) as f:
    assert f.read() == final_before  # the run's final evaluation is left alone
  assert cli.main(["flaxvae", "report", "--workdir", workdir]) == 0
  assert sorted(os.listdir(os.path.join(workdir, "report"))) == sorted(
    f"{name}.png"
    for name in (
      "elbo_and_log_px",
      "kl_to_prior_and_posterior",
      "elbo_surgery",
      "active_units",
      "rate_by_layer",
      "active_units_by_layer",
    )
  )
  assert cli.main(["flaxvae", "evaluate", "--workdir", workdir, "--step", "7"]) == 2
  assert "no checkpoint for step 7" in capsys.readouterr().err


def test_api_evaluate_names_the_result_file_by_its_settings(trained):
  """Another K gets its own file; the config's own final settings rewrite eval.json (same
  figures: evaluation is keyed by example id)."""
  workdir = trained["workdir"]
  row, path = flaxvae.api.evaluate(workdir, num_importance_samples=20, max_examples=16)
  assert os.path.basename(path) == "eval_test_K20_N16.json"
  assert row["num_examples"] == 16 and row["num_importance_samples"] == 20
  with open(os.path.join(workdir, evaluation.FINAL_FILE)) as f:
    final = json.load(f)
  assert final["num_examples"] == 48 and final["num_importance_samples"] == 10
  row, path = flaxvae.api.evaluate(workdir)
  assert os.path.basename(path) == evaluation.FINAL_FILE
  assert row["num_examples"] == 48
  assert row["log_px"] == pytest.approx(final["log_px"], rel=1e-5)
  assert row["amortization_gap"] == pytest.approx(final["amortization_gap"], rel=1e-4, abs=1e-4)


def test_result_file_names():
  final = settings.resolve(
    set_keys(
      defaults.base_config(),
      **{"eval.final_num_examples": 48, "eval.final_num_importance_samples": 10},
    )
  ).eval
  name = lambda *args: evaluation.result_file(final, "test", *args)
  assert name("test", 48, 10) == evaluation.FINAL_FILE
  assert name("test", 32, 10) == "eval_test_K10_N32.json"
  assert name("test", 48, 100) == "eval_test_K100_N48.json"
  assert name("train", 48, 10) == "eval_train_K10_N48.json"
  whole = dataclasses.replace(final, final_num_examples=0, final_num_importance_samples=5000)
  assert evaluation.result_file(whole, "test", "test", None, 5000) == evaluation.FINAL_FILE
  assert evaluation.result_file(whole, "test", "test", None, 100) == "eval_test_K100_Nall.json"


def test_max_examples_zero_evaluates_the_whole_split(trained):
  row, path = flaxvae.api.evaluate(trained["workdir"], num_importance_samples=10, max_examples=0)
  assert row["num_examples"] == 64


def test_ad_hoc_evaluation_of_fewer_examples_than_the_amortization_gap_uses(trained):
  """--max_examples 8 with eval.amortization_examples 16: the amortization gap is measured on
  (at most) the examples evaluated, and the ad-hoc file is written."""
  row, path = flaxvae.api.evaluate(trained["workdir"], num_importance_samples=10, max_examples=8)
  assert os.path.basename(path) == "eval_test_K10_N8.json"
  assert row["num_examples"] == 8 and row["amortization_examples"] <= 8


def test_ais_through_the_model_contract_finds_the_exact_marginal(linear):
  """AIS from the encoder's q to p(x, z) on the linear-Gaussian model: exact p(x) known."""
  run = linear["run"]
  fn = diagnostics.ais_fn(run.graphdef, run.protocol, num_steps=100, num_chains=8, num_leapfrog=5)
  values = linear["evaluator"].per_example(
    "ais", fn, linear["params"], evaluation.eval_rng(run.settings.seed), 16
  )
  error = values["log_px_ais"] - linear["exact_log_px"][:16]
  assert abs(np.mean(error)) < 0.05 and np.max(np.abs(error)) < 0.3, error
  assert np.all((values["ais_accept_rate"] > 0.3) & (values["ais_accept_rate"] <= 1.0))
  # From the prior: a worse start, the same answer.
  fn = diagnostics.ais_fn(run.graphdef, run.protocol, 200, 8, 5, init="prior")
  values = linear["evaluator"].per_example(
    "ais_prior", fn, linear["params"], evaluation.eval_rng(run.settings.seed), 16
  )
  assert abs(np.mean(values["log_px_ais"] - linear["exact_log_px"][:16])) < 0.1


def test_ais_with_one_step_is_the_one_sample_importance_estimate(linear):
  run = linear["run"]
  model = run.model_with(linear["params"])
  x = protocols.eval_targets(jnp.asarray(images(4, 1)), jnp.arange(4), run.protocol)
  keys = jax.random.split(jax.random.key(3), 4)
  one = diagnostics.ais_log_px(model, x, keys, num_steps=1, num_chains=1, num_leapfrog=1)
  # The same start AIS draws: z0 ~ q(z|x); one step from beta 0 to 1 weighs it by p(x, z0)/q(z0|x).
  for i in range(4):
    start_key, _ = jax.random.split(keys[i])
    z0, log_q = diagnostics._ais_start(model, x[i : i + 1], start_key, 1, "auto")
    expected = model.log_joint(x[i : i + 1], z0) - log_q(z0)
    np.testing.assert_allclose(one["log_px_ais"][i], expected[0], rtol=1e-5)


def test_bdmc_sandwiches_the_marginal_of_simulated_data(linear):
  run = linear["run"]
  fn = diagnostics.bdmc_fn(run.graphdef, num_steps=200, num_leapfrog=5)
  values = linear["evaluator"].per_example(
    "bdmc",
    fn,
    linear["params"],
    evaluation.eval_rng(run.settings.seed),
    rows=np.zeros((16, 1), np.float32),
  )
  gap = values["bdmc_upper"] - values["bdmc_lower"]
  # Both bounds hold in expectation; one chain each, so single examples scatter by ~0.3 nats.
  assert -0.15 < np.mean(gap) < 0.2 and np.mean(np.abs(gap)) < 0.4, gap
