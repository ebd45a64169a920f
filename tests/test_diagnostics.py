"""Diagnostics against closed forms (a linear-Gaussian VAE), and on a briefly trained MLP VAE."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flaxvae
from flaxvae import cli, data as data_lib, defaults, diagnostics, evaluate, losses, models, train

LATENT, SIDE, OBS_LOGVAR = 3, 4, math.log(0.5)
DIMS = SIDE * SIDE


@models.register("linear")
class LinearVAE(nnx.Module):
  """Linear encoder with a shared diagonal variance; linear decoder (probabilistic PCA)."""

  def __init__(self, *, image_shape, num_params, latent_dim, rngs, dtype=jnp.float32, **unused):
    dims = math.prod(image_shape)
    self.image_shape, self.num_params = image_shape, num_params
    self.enc = nnx.Linear(dims, latent_dim, rngs=rngs)
    self.q_logvar = nnx.Param(jnp.zeros((latent_dim,)))
    self.dec = nnx.Linear(latent_dim, dims * num_params, rngs=rngs)

  def encode(self, x):
    mean = self.enc(x.reshape(x.shape[0], -1))
    return mean, jnp.broadcast_to(self.q_logvar[...], mean.shape)

  def decode(self, z):
    return self.dec(z).reshape(z.shape[0], *self.image_shape, self.num_params)


def images(n, seed, side=SIDE):
  return np.random.default_rng(seed).integers(0, 256, (n, side, side, 1), dtype=np.uint8)


@pytest.fixture(scope="module")
def linear():
  """A linear-Gaussian run whose encoder is near, but not at, the exact posterior."""
  splits = {"train": images(64, 0), "test": images(64, 1)}
  mp = pytest.MonkeyPatch()
  mp.setattr(data_lib, "load_images", lambda data_config, split: splits[split])
  config = defaults.base_config()
  config.model.name, config.model.latent_dim = "linear", LATENT
  config.objective.likelihood, config.objective.gaussian_logvar = "gaussian", OBS_LOGVAR
  config.batch_size, config.eval.batch_size = 16, 32
  run = train.Run(config)
  mp.undo()
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
  exact_kl = np.array([_kl_diag_to_full(m, q_var, mu, precision) for m, mu in zip(q_mean, post_mean)])
  optimal_kl = 0.5 * (np.sum(np.log(np.diag(precision))) - np.linalg.slogdet(precision)[1])
  evaluator = evaluate.Evaluator(run.runner, splits["test"], config.eval.batch_size)
  return dict(run=run, params=params, evaluator=evaluator, exact_log_px=exact_log_px,
              exact_kl=exact_kl, optimal_kl=optimal_kl)


def _log_normal_full(x, mean, cov):
  d = x - mean
  return -0.5 * (len(x) * math.log(2 * math.pi) + np.linalg.slogdet(cov)[1] + d @ np.linalg.solve(cov, d))


def _kl_diag_to_full(m, v, mu, precision):
  """KL(N(m, diag v) || N(mu, precision^-1))."""
  d = mu - m
  return 0.5 * (np.sum(np.diag(precision) * v) + d @ precision @ d - len(m)
                - np.linalg.slogdet(precision)[1] - np.sum(np.log(v)))


def importance(setup, k):
  run = setup["run"]
  fn = diagnostics.importance_fn(run.graphdef, run.step_cfg, k)
  return setup["evaluator"].per_example(f"importance_{k}", fn, setup["params"],
                                        evaluate.eval_rng(run.config))


def test_log_px_converges_to_the_exact_marginal_and_the_gap_to_the_exact_kl(linear):
  errors = []
  for k in (1, 10, 100, 1000):
    values = importance(linear, k)
    errors.append(float(np.mean(linear["exact_log_px"] - values["log_px"])))
    assert np.all(values["log_px"] >= values["elbo"] - 1e-4)
  assert errors[0] > errors[1] > errors[3] > -0.01, errors
  assert abs(errors[3]) < 0.02, errors
  np.testing.assert_allclose(values["log_px"], linear["exact_log_px"], atol=0.3)
  # K = 1000: the inference gap is the exact KL(q(z|x) || p(z|x)) of this encoder.
  assert np.mean(linear["exact_kl"]) > 0.3
  np.testing.assert_allclose(np.mean(values["inference_gap"]), np.mean(linear["exact_kl"]), atol=0.03)
  np.testing.assert_allclose(values["inference_gap"], linear["exact_kl"], atol=0.3)


def test_chunking_does_not_change_the_estimate():
  key = jax.random.key(3)
  x = jax.random.uniform(key, (5, 2, 3, 1))
  w = jax.random.normal(key, (2, 6))
  decode = lambda z: (z @ w).reshape(-1, 2, 3, 1, 1)
  likelihood = losses.get_likelihood("bernoulli")
  mean, logvar = jnp.ones((5, 2)), -jnp.ones((5, 2))
  keys = jax.random.split(key, 5)
  bounds = [diagnostics.importance_bounds(decode, likelihood, x, mean, logvar, keys, 50, chunk)
            for chunk in (7, 50)]
  for other in bounds[1:]:
    np.testing.assert_allclose(np.array(other), np.array(bounds[0]), rtol=1e-5)


def test_amortization_gap_matches_the_best_diagonal_gaussian(linear):
  run = linear["run"]
  fn = diagnostics.amortization_fn(run.graphdef, run.step_cfg, 300, 0.05, num_eval_samples=500)
  gaps = linear["evaluator"].per_example("amortization", fn, linear["params"],
                                         evaluate.eval_rng(run.config))
  exact = linear["exact_kl"] - linear["optimal_kl"]  # KL(q || p(z|x)) - KL(q* || p(z|x))
  np.testing.assert_allclose(np.mean(gaps["elbo_optimized"] - gaps["elbo_encoder"]), np.mean(exact),
                             atol=0.05)


def test_elbo_surgery_adds_up_and_matches_the_gaussian_closed_form(linear):
  """Gaussian data and a linear encoder: q(z) is Gaussian, so I(x;z) and KL(q(z)||p(z)) are known."""
  n, latent, data_dims = 4000, 2, 3
  rng = np.random.default_rng(1)
  a = rng.normal(size=(data_dims, latent)) * 0.7
  q_var = np.array([0.3, 0.6])
  x = rng.normal(size=(n, data_dims))
  means, logvars = (x @ a + 0.2).astype(np.float32), np.tile(np.log(q_var), (n, 1)).astype(np.float32)
  evaluator = evaluate.Evaluator(linear["run"].runner, x, 1000)
  values = evaluator.per_example("aggregate", diagnostics.aggregate_fn(num_samples=8),
                                 (means, logvars), evaluate.eval_rng(linear["run"].config),
                                 rows=np.stack([means, logvars], axis=1))
  rate = np.asarray(losses.gaussian_kl(means, logvars))
  np.testing.assert_allclose(values["mutual_info"] + values["marginal_kl"], rate, rtol=1e-5, atol=1e-4)
  agg_cov = a.T @ a + np.diag(q_var)
  exact_mi = 0.5 * (np.linalg.slogdet(agg_cov)[1] - np.sum(np.log(q_var)))
  agg_mean = np.full(latent, 0.2)
  exact_marginal_kl = 0.5 * (np.trace(agg_cov) + agg_mean @ agg_mean - latent - np.linalg.slogdet(agg_cov)[1])
  assert abs(np.mean(values["mutual_info"]) - exact_mi) < 0.05, (np.mean(values["mutual_info"]), exact_mi)
  assert abs(np.mean(values["marginal_kl"]) - exact_marginal_kl) < 0.05


# ----------------------------------------------------------------------------
# A briefly trained MLP VAE: training writes the diagnostics, the API and CLI read them.
# ----------------------------------------------------------------------------
def structured_images(n, seed):
  """Images driven by a 2-d latent, so a VAE has something to encode."""
  rng = np.random.default_rng(seed)
  basis = np.random.default_rng(99).normal(size=(2, 64))
  return (255 / (1 + np.exp(-rng.normal(size=(n, 2)) @ basis * 2))).astype(np.uint8).reshape(n, 8, 8, 1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  splits = {"train": structured_images(512, 0), "test": structured_images(64, 1)}
  mp = pytest.MonkeyPatch()
  mp.setattr(data_lib, "load_images", lambda data_config, split: splits[split])
  config = defaults.base_config()
  config.model.hidden, config.model.latent_dim = (32,), 4
  config.batch_size, config.num_steps, config.steps_per_dispatch = 32, 200, 100
  config.log_every_steps = config.eval.every_steps = config.checkpoint.every_steps = 100
  config.eval.batch_size, config.eval.num_examples, config.eval.num_importance_samples = 64, 32, 10
  config.eval.final_num_importance_samples = 10  # the periodic compilation serves both
  config.eval.final_num_examples = 48
  config.eval.amortization_examples, config.eval.amortization_steps = 16, 20
  config.data.data_dir = "/nonexistent"
  workdir = str(tmp_path_factory.mktemp("trained"))
  final = train.train(config, workdir)
  yield dict(workdir=workdir, final=final, model=flaxvae.load(workdir), splits=splits)
  mp.undo()


def test_training_writes_periodic_and_final_diagnostics(trained):
  rows = [json.loads(line) for line in open(os.path.join(trained["workdir"], "metrics.jsonl"))]
  evals = [r for r in rows if r["split"] == "test"]
  assert [r["step"] for r in evals] == [100, 200] and [r["final"] for r in evals] == [False, True]
  assert evals[0]["num_examples"] == 32 and evals[1]["num_examples"] == 48
  with open(os.path.join(trained["workdir"], "eval.json")) as f:
    result = json.load(f)
  for key in ("elbo", "rate", "distortion", "log_px", "nll", "bits_per_dim", "inference_gap",
              "mutual_info", "marginal_kl", "active_units", "amortization_gap", "approximation_gap"):
    assert key in result and key + "_stderr" in result, key
  assert result["num_examples"] == 48 and result["log_px"] >= result["elbo"]
  assert result["mutual_info"] + result["marginal_kl"] == pytest.approx(result["rate"], abs=1e-3)


def test_log_px_bounds_the_elbo_and_grows_with_k(trained):
  model = trained["model"]
  x = trained["splits"]["test"].astype(np.float32) / 255.0
  key = jax.random.key(0)
  means = []
  for k in (1, 10, 100, 1000):
    log_px, elbo = np.asarray(model.log_marginal(x, key, k)), np.asarray(model.elbo(x, key, k))
    assert np.all(log_px >= elbo - 1e-4)
    means.append(log_px.mean())
  # E[IWAE_K] grows with K; once the gap is closed, the means may tie within Monte Carlo noise.
  assert all(later > earlier - 0.02 for earlier, later in zip(means, means[1:])), means
  assert means[3] > means[0] + 0.1, means


def test_api_shapes_and_cli(trained, monkeypatch, capsys):
  model, x = trained["model"], trained["splits"]["test"][:5]
  mean, logvar = model.encode(x)
  assert mean.shape == logvar.shape == (5, 4)
  assert model.decode(mean).shape == (5, 8, 8, 1, 1)
  assert model.log_likelihood(x, mean).shape == (5,) and model.log_prior(mean).shape == (5,)
  assert model.sample(jax.random.key(1), 3).shape == (3, 8, 8, 1)
  workdir = trained["workdir"]
  monkeypatch.setattr(data_lib, "load_images", lambda data_config, split: trained["splits"][split])
  np.testing.assert_allclose(flaxvae.load_dataset(workdir, "test"), trained["splits"]["test"] / 255.0,
                             rtol=1e-6)
  assert cli.main(["flaxvae", "evaluate", "--workdir", workdir, "--num_importance_samples", "10",
                   "--max_examples", "32"]) == 0
  assert json.load(open(os.path.join(workdir, "eval.json")))["num_examples"] == 32
  assert cli.main(["flaxvae", "report", "--workdir", workdir]) == 0
  assert len(os.listdir(os.path.join(workdir, "report"))) == 4
  assert cli.main(["flaxvae", "evaluate", "--workdir", workdir, "--step", "7"]) == 2
  assert "no checkpoint for step 7" in capsys.readouterr().err
