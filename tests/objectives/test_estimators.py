"""AIS, reverse AIS and PSIS k-hat against known answers.

Known answers: the exact log p(x) of a linear-Gaussian model (closed form) and of
a 2-D latent model with a bimodal posterior (dense quadrature, float64 numpy);
the Pareto shape of weights with a known tail; and an independent numpy
transcription of the PSIS tail fit. The jitted computations run in float32.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxvae.objectives import estimators

jax.config.update("jax_enable_x64", False)
LOG_2PI = math.log(2 * math.pi)


def log_normal(z, mean, sd):
  return jnp.sum(-0.5 * ((z - mean) / sd) ** 2 - jnp.log(sd) - 0.5 * LOG_2PI, axis=-1)


# ---------------------------------------------------------------------------
# Linear-Gaussian model: z ~ N(0, I_d), x | z ~ N(W z + c, s^2 I_D)
# ---------------------------------------------------------------------------
class LinearGaussian:
  def __init__(self, seed, d=3, D=6, s=0.5):
    rng = np.random.default_rng(seed)
    self.d, self.s = d, s
    self.W, self.c = rng.normal(size=(D, d)), rng.normal(size=D)
    self.rng = rng

  def simulate(self, b):
    """x from the model; z is then an exact posterior sample of x."""
    z = self.rng.normal(size=(b, self.d))
    return z @ self.W.T + self.c + self.s * self.rng.normal(size=(b, self.W.shape[0])), z

  def exact_log_marginal(self, x):
    cov = self.W @ self.W.T + self.s**2 * np.eye(len(self.c))
    chol = np.linalg.cholesky(cov)
    r = np.linalg.solve(chol, (x - self.c).T)
    return -0.5 * np.sum(r**2, 0) - np.log(np.diag(chol)).sum() - 0.5 * len(self.c) * LOG_2PI

  def log_joint(self, x):
    x, W, c = (jnp.asarray(a, jnp.float32) for a in (x, self.W, self.c))
    return lambda z: log_normal(z, 0.0, 1.0) + log_normal(x, z @ W.T + c, self.s)


def folded_init(key, mean, sd, num_chains, b, d):
  return (mean + sd * jax.random.normal(key, (num_chains * b, d))).astype(jnp.float32)


# One chain's log weight spreads by 0.4-0.8 nats (init = prior) or 0.6-1.1 (the
# narrow, shifted init, whose weights are also heavier-tailed) at 500 steps; with 128
# chains the standard error of the mean error over the 8 x's is then ~0.015 or ~0.03,
# that of one x up to ~0.08 or ~0.12.
@pytest.mark.parametrize(
  "init_mean, init_sd, tol, tol_each",
  [(0.0, 1.0, 0.05, 0.2), (1.0, 0.5, 0.1, 0.5)],
  ids=["prior", "mismatched"],
)
def test_ais_matches_linear_gaussian_marginal(init_mean, init_sd, tol, tol_each):
  model, b, chains = LinearGaussian(0), 8, 128
  x, _ = model.simulate(b)
  exact = model.exact_log_marginal(x)
  run = jax.jit(
    lambda key, z0: estimators.ais_log_marginal(
      key,
      z0,
      lambda z: log_normal(z, init_mean, init_sd),
      model.log_joint(np.tile(x, (chains, 1))),
      estimators.sigmoid_schedule(500),
      chains,
    )
  )
  out = run(
    jax.random.key(1), folded_init(jax.random.key(2), init_mean, init_sd, chains, b, model.d)
  )
  error = np.asarray(out["log_z"]) - exact
  assert abs(np.mean(error)) < tol and np.all(np.abs(error) < tol_each), error
  assert out["log_w"].shape == (chains, b) and out["step_sizes"].shape == (500, chains * b)
  assert 0.5 < float(np.mean(out["accept_rate"])) < 0.8


def test_ais_with_one_step_is_importance_sampling_on_a_pytree_latent():
  model, b = LinearGaussian(1), 5
  x, _ = model.simulate(b)
  joint = model.log_joint(x)
  # The 3 latents as a pytree of leaves with different ranks, [b, 2] and [b, 1, 1].
  flat = lambda z: jnp.concatenate([z["a"], z["b"].reshape(-1, 1)], axis=1)
  init, target = (lambda z: log_normal(flat(z), 0.0, 1.0)), (lambda z: joint(flat(z)))
  z0 = folded_init(jax.random.key(0), 0.0, 1.0, 1, b, model.d)
  z0 = {"a": z0[:, :2], "b": z0[:, 2:].reshape(b, 1, 1)}
  out = jax.jit(lambda key, z0: estimators.ais(key, z0, init, target, jnp.array([0.0, 1.0])))(
    jax.random.key(1), z0
  )
  np.testing.assert_allclose(out["log_z"], target(z0) - init(z0), rtol=1e-6)
  assert jax.tree.map(jnp.shape, out["state"]) == {"a": (b, 2), "b": (b, 1, 1)}
  assert not np.allclose(out["state"]["a"], z0["a"])  # the final HMC move went somewhere


def test_bdmc_sandwiches_linear_gaussian_marginal_and_closes_with_more_steps():
  model, b = LinearGaussian(2), 128
  x, z_exact = model.simulate(b)  # z_exact is an exact posterior sample of x
  exact = model.exact_log_marginal(x).mean()
  init, target = (lambda z: log_normal(z, 0.0, 1.0)), model.log_joint(x)

  @jax.jit
  def bounds(key, z0, z_exact, betas):
    forward = estimators.ais(key, z0, init, target, betas)
    reverse = estimators.reverse_ais(
      jax.random.fold_in(key, 1),
      z_exact,
      init,
      target,
      betas,
      step_size=forward["step_sizes"],
      adapt=False,
    )
    return forward["log_z"].mean(), reverse["log_z"].mean()

  gaps = []
  for steps in (10, 500):
    z0 = folded_init(jax.random.key(steps), 0.0, 1.0, 1, b, model.d)
    lower, upper = bounds(
      jax.random.key(3),
      z0,
      jnp.asarray(z_exact, jnp.float32),
      jnp.asarray(estimators.sigmoid_schedule(steps), jnp.float32),
    )
    # Averages of 128 single chains: standard errors ~0.05 at 500 steps.
    assert lower <= exact + 0.1 and upper >= exact - 0.1, (steps, lower, exact, upper)
    gaps.append(float(upper - lower))
  assert gaps[0] > 2 and gaps[1] < 0.5, gaps


def test_reverse_ais_replays_a_forward_schedule_at_the_same_betas():
  """Step size 0 freezes a chain: zeros at betas[1..T-1] and not at betas[T] freeze the reverse
  chain only."""
  b, steps = 4, 3
  sizes = jnp.zeros((steps, b)).at[-1].set(0.3)  # row t for betas[t + 1]
  init, target = (lambda z: log_normal(z, 0.0, 1.0)), (lambda z: log_normal(z, 1.0, 0.5))
  z = jax.random.normal(jax.random.key(0), (b, 2))
  betas = estimators.linear_schedule(steps)
  reverse = estimators.reverse_ais(
    jax.random.key(1), z, init, target, betas, step_size=sizes, adapt=False
  )
  np.testing.assert_array_equal(reverse["state"], z)
  np.testing.assert_allclose(reverse["log_z"], target(z) - init(z), rtol=1e-6)
  np.testing.assert_array_equal(reverse["step_sizes"][:-1], sizes[:-1])
  forward = estimators.ais(jax.random.key(1), z, init, target, betas, step_size=sizes, adapt=False)
  assert not np.allclose(forward["state"], z)


# ---------------------------------------------------------------------------
# A bimodal posterior: z ~ N(0, I_2), x | z ~ N((z1^2 + 0.3 z1, z2), 0.4^2 I_2)
# ---------------------------------------------------------------------------
NOISE = 0.4


def bimodal_mean(z1, z2):
  return z1**2 + 0.3 * z1, z2


def bimodal_exact_log_marginal(x):
  """log p(x) by quadrature on a dense grid (float64): the posterior's modes are ~0.13 wide."""
  grid = np.linspace(-6, 6, 2401)
  z1, z2 = np.meshgrid(grid, grid, indexing="ij")
  m1, m2 = bimodal_mean(z1, z2)
  out = []
  for xi in x:
    log_joint = (
      -0.5 * (z1**2 + z2**2)
      - LOG_2PI
      - 0.5 * ((xi[0] - m1) ** 2 + (xi[1] - m2) ** 2) / NOISE**2
      - 2 * math.log(NOISE)
      - LOG_2PI
    )
    peak = log_joint.max()
    out.append(peak + math.log(np.exp(log_joint - peak).sum() * (grid[1] - grid[0]) ** 2))
  return np.array(out)


def test_ais_matches_quadrature_on_a_bimodal_posterior():
  x = np.array([[2.5, 0.0], [1.5, 1.0], [3.0, -0.5]])
  # At 1000 steps one chain's log weight spreads by 0.5-0.8 nats: 512 chains put
  # the estimate within ~0.035 (one standard error).
  chains, b = 512, len(x)
  exact = bimodal_exact_log_marginal(x)
  xs = jnp.asarray(np.tile(x, (chains, 1)), jnp.float32)

  def log_joint(z):
    m1, m2 = bimodal_mean(z[:, 0], z[:, 1])
    return log_normal(z, 0.0, 1.0) + log_normal(xs, jnp.stack([m1, m2], -1), NOISE)

  run = jax.jit(
    lambda key, z0: estimators.ais_log_marginal(
      key,
      z0,
      lambda z: log_normal(z, 0.0, 1.0),
      log_joint,
      estimators.sigmoid_schedule(1000),
      chains,
    )
  )
  out = run(jax.random.key(0), folded_init(jax.random.key(1), 0.0, 1.0, chains, b, 2))
  np.testing.assert_allclose(out["log_z"], exact, atol=0.1)
  # The chains end in both modes (z1 > 0 and z1 < 0), and on them.
  z1 = np.asarray(out["state"][:, 0])
  assert 0.3 < np.mean(z1 > 0) < 0.8
  assert np.mean(np.abs(bimodal_mean(z1, 0)[0] - np.tile(x[:, 0], chains)) < 3 * NOISE) > 0.95


# ---------------------------------------------------------------------------
# PSIS k-hat
# ---------------------------------------------------------------------------
def reference_khat(log_w):
  """Independent numpy float64 transcription of PSIS's tail fit for one example (loo/ArviZ)."""
  log_w = np.sort(np.asarray(log_w, np.float64))
  log_w -= log_w[-1]
  n = len(log_w)
  m = int(np.ceil(min(n / 5, 3 * np.sqrt(n))))
  x = np.exp(log_w[-m:]) - np.exp(log_w[-m - 1])
  grid = 30 + int(np.floor(np.sqrt(m)))
  theta = 1 / x[-1] + (1 - np.sqrt(grid / (np.arange(1, grid + 1) - 0.5))) / (
    3 * x[int(m / 4 + 0.5) - 1]
  )
  k = np.array([np.mean(np.log1p(-t * x)) for t in theta])
  loglik = m * (np.log(-theta / k) - k - 1)
  weights = np.array([1 / np.sum(np.exp(loglik - l)) for l in loglik])
  keep = weights >= 10 * np.finfo(float).eps
  weights = weights[keep] / weights[keep].sum()
  theta_hat = np.sum(theta[keep] * weights)
  k_hat = np.mean(np.log1p(-theta_hat * x))
  return (m * k_hat + 10 * 0.5) / (m + 10)


def pareto_log_weights(rng, shape, num, b):
  """log of Pareto(alpha = 1/shape) samples: Exponential / alpha."""
  return (shape * rng.exponential(size=(num, b))).astype(np.float32)


def gaussian_is_log_weights(rng, proposal_sd, num, b):
  """IS of N(0, 1) by N(0, proposal_sd^2) in 1-D: tail shape max(0, 1 - proposal_sd^2)."""
  z = proposal_sd * rng.normal(size=(num, b))
  return (-0.5 * z**2 + 0.5 * (z / proposal_sd) ** 2 + math.log(proposal_sd)).astype(np.float32)


khat = jax.jit(estimators.psis_khat)
NUM, B = 4000, 16  # one compiled shape; the tail fit then uses the M = 190 largest weights


@pytest.mark.parametrize("shape", [0.5, 1.0])
def test_khat_recovers_a_known_pareto_tail(shape):
  # Sampling sd of k-hat from 190 tail points is ~(1 + shape) / sqrt(190) <= 0.15.
  estimate = np.asarray(khat(pareto_log_weights(np.random.default_rng(0), shape, NUM, B)))
  assert abs(estimate.mean() - shape) < 0.1 and np.all(np.abs(estimate - shape) < 0.5), estimate


def test_khat_of_gaussian_importance_sampling():
  rng = np.random.default_rng(1)
  wide = np.asarray(khat(gaussian_is_log_weights(rng, 1.5, NUM, B)))
  assert np.all(wide < 0.5), wide  # bounded weights: a wider proposal is safe
  narrow = np.asarray(khat(gaussian_is_log_weights(rng, 0.5, NUM, B)))
  assert 0.55 < narrow.mean() < 0.9, narrow  # true tail shape 0.75: too narrow a proposal


def test_khat_matches_the_numpy_reference():
  rng = np.random.default_rng(2)
  log_w = np.concatenate(
    [
      pareto_log_weights(rng, 0.7, NUM, 4),
      gaussian_is_log_weights(rng, 0.6, NUM, 4),
      gaussian_is_log_weights(rng, 1.5, NUM, 4),
      3 * rng.normal(size=(NUM, 4)),
    ],
    axis=1,
  )
  log_w = log_w.astype(np.float32)
  # Agreement to float32 round-off; bounded weights (k < 0) lose a little more to
  # log1p(-theta x) with theta x close to 1.
  np.testing.assert_allclose(
    khat(log_w), [reference_khat(col) for col in log_w.T], rtol=5e-4, atol=1e-5
  )


def test_khat_needs_enough_samples():
  # K = 20 leaves a tail of 4 weights; K = 30 one of 6.
  assert np.all(np.isinf(estimators.psis_khat(np.zeros((20, 3), np.float32))))
  assert np.all(np.isfinite(estimators.psis_khat(np.random.default_rng(0).normal(size=(30, 3)))))


def test_khat_of_a_tail_that_underflows_is_inf_not_nan():
  # One weight outweighs the rest of the tail by far more than float32's range (exp(-88)):
  # the Pareto fit degenerates; that example reads as unreliable, the others are unaffected.
  log_w = np.random.default_rng(0).normal(size=(100, 2)).astype(np.float32)
  log_w[:, 0] = np.linspace(-5000.0, 0.0, 100)
  k = np.asarray(khat(log_w))
  assert np.isinf(k[0]) and np.isfinite(k[1]), k
