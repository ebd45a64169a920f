"""Estimators of log p(x) beyond the ELBO, and a diagnostic of their reliability.

Pure functions of arrays (math, numpy, jax only). Latents are arbitrary pytrees
whose leaves have a leading batch axis [b, ...]; every log-density argument maps
such a pytree to [b], one number per example. Examples must be independent: the
gradient of the *sum* of the per-example densities is then, example by example,
the gradient of each one, which is how one `jax.grad` serves the whole batch.

* `psis_khat`: the Pareto-smoothed importance sampling shape estimate. The
  variance of an importance-sampling estimate is finite only when the weights'
  tail is lighter than a Pareto tail of shape 1/2, and the estimate is practically
  useless beyond 0.7; k-hat estimates that shape from the largest weights.
* `ais` / `ais_log_marginal`: annealed importance sampling (Neal, 2001), an
  unbiased estimate of p(x) whose log is a stochastic lower bound of log p(x),
  usually far tighter than the importance-weighted bound with the same compute.
* `reverse_ais`: the reverse chain of bidirectional Monte Carlo (Grosse,
  Ghahramani & Adams, 2015), a stochastic upper bound of log p(x) when started
  at an exact posterior sample; with `ais` it sandwiches log p(x).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

# Step-size adaptation after Wu et al. (2017): multiply by 1.02 or 0.98, clipped.
_STEP_UP, _STEP_DOWN = 1.02, 0.98
_MIN_STEP, _MAX_STEP = 1e-4, 0.5


# ---------------------------------------------------------------------------
# PSIS k-hat
# ---------------------------------------------------------------------------
PSIS_MIN_SAMPLES = 21  # fewer leave under 5 tail samples: no tail to fit


def psis_khat(log_w):
  """Pareto shape estimate k-hat of importance weights, per example.

  Args:
    log_w: [K, b] log importance weights (K samples of each of b examples; any
      trailing shape works). Only differences within a column matter.
  Returns:
    [b] k-hat. Reading (Vehtari et al., "Pareto smoothed importance sampling"):
    k < 0.5 the weights have finite variance and the estimate converges at the
    usual rate; 0.5 < k < 0.7 finite mean but slow convergence; k > 0.7 the
    estimate is unreliable (the paper's sharper threshold for K samples is
    min(1 - 1/log10(K), 0.7)). `inf` when K is too small (fewer than 5 tail
    samples, K < PSIS_MIN_SAMPLES) to fit a tail at all, and for an example whose
    largest weight outweighs most of its tail by more than float32's range
    (exp(-88)): the fit degenerates, and the estimate is as unreliable as can be.

  Method (as in the loo/ArviZ packages): the M = ceil(min(K/5, 3 sqrt(K)))
  largest weights, minus the (M+1)-th largest, are fitted by a generalized
  Pareto distribution with the Zhang & Stephens (2009) estimator: a posterior
  mean of theta = -k/sigma over a fixed grid of 30 + floor(sqrt(M)) values,
  weighted by the profile likelihood. The shape is then shrunk towards 0.5 by
  Vehtari's weakly informative prior, k <- (M k + 10 * 0.5) / (M + 10), which
  stabilizes the estimate for small M. The weights are scaled by their maximum
  first (k is scale invariant) so that exp cannot overflow. Jit-able and
  vectorized over examples: K is static, so M and the grid are too.
  """
  log_w = jnp.asarray(log_w)
  num = log_w.shape[0]
  if num < PSIS_MIN_SAMPLES:
    return jnp.full(log_w.shape[1:], jnp.inf, log_w.dtype)
  m = int(math.ceil(min(0.2 * num, 3 * math.sqrt(num))))
  # The M + 1 largest, ascending. top_k, not a sort of all K: XLA:CPU's sort of every weight
  # was a visible share of the importance pass (docs/evaluation.md), top_k a small fraction of it.
  top = jax.lax.top_k(jnp.moveaxis(log_w, 0, -1), m + 1)[0]
  s = jnp.moveaxis(top[..., ::-1], -1, 0)
  s = s - s[-1]
  exceed = jnp.exp(s[1:]) - jnp.exp(s[0])  # [M, b], ascending
  k = _gpd_shape(exceed)
  return jnp.where(jnp.isnan(k), jnp.inf, k)  # a tail that underflowed: see the docstring


def _gpd_shape(x):
  """Zhang & Stephens (2009) GPD shape of sorted exceedances x [n, ...], with the prior."""
  n = x.shape[0]
  grid = 30 + int(math.sqrt(n))
  expand = lambda v: v.reshape(v.shape + (1,) * (x.ndim - 1))
  j = jnp.arange(1, grid + 1, dtype=x.dtype)
  # The grid of theta = -k/sigma, centered by the first quartile and maximum.
  quartile = x[int(n / 4 + 0.5) - 1]
  theta = 1 / x[-1] + expand(1 - jnp.sqrt(grid / (j - 0.5))) / (3 * quartile)  # [grid, ...]
  # For each theta the profile MLE of k is mean(log(1 - theta x)); theta < 1/max(x) keeps it finite.
  k = jnp.mean(jnp.log1p(-theta[:, None] * x[None]), axis=1)
  profile = n * (jnp.log(-theta / k) - k - 1)
  # Posterior mean of theta under a flat prior on the grid. (loo/ArviZ drop weights
  # below 1e-15 first; that changes k by less than float32 resolution, so not here.)
  theta_hat = jnp.sum(jax.nn.softmax(profile, axis=0) * theta, axis=0)
  k_hat = jnp.mean(jnp.log1p(-theta_hat * x), axis=0)
  return (n * k_hat + 10 * 0.5) / (n + 10)


# ---------------------------------------------------------------------------
# Annealing schedules
# ---------------------------------------------------------------------------
def linear_schedule(num_steps):
  """betas 0 = b_0 < ... < b_T = 1 equally spaced: num_steps + 1 values."""
  return np.linspace(0.0, 1.0, num_steps + 1)


def sigmoid_schedule(num_steps, rad=4):
  """num_steps + 1 betas from 0 to 1 along a sigmoid of [-rad, rad] (Grosse et al., 2015; Wu et
  al., 2017).

  Most of the free energy changes near both ends of the path (leaving the
  initial distribution and sharpening into the posterior), so the sigmoid spends
  more, smaller steps there than a linear schedule does.
  """
  s = 1 / (1 + np.exp(-np.linspace(-rad, rad, num_steps + 1)))
  return (s - s[0]) / (s[-1] - s[0])


# ---------------------------------------------------------------------------
# Annealed importance sampling with HMC transitions
# ---------------------------------------------------------------------------
def _per_example(v, leaf):
  """[b] -> broadcastable against a leaf [b, ...]."""
  return v.reshape(v.shape + (1,) * (leaf.ndim - 1))


def _anneal(
  key, z, init_log_prob, log_target, betas, num_leapfrog, step_size, target_accept, adapt
):
  """Walk z along betas[0] -> betas[-1]: at each step add the AIS increment, then move by HMC.

  Step t (t = 1..T) adds f_t(z) - f_{t-1}(z) = (b_t - b_{t-1}) (log_target(z) -
  init_log_prob(z)) at the current z and then applies an HMC transition that
  leaves f_t invariant. Run forwards this is AIS; run on reversed betas it is the
  reverse chain of BDMC (the increments then sum to the log of an unbiased
  estimate of 1/Z).

  step_size is, when adapt, the initial size (scalar or [b]), multiplied after
  every transition by 1.02 where that transition's acceptance probability was
  above target_accept and by 0.98 otherwise; when not adapt, a [T, b] schedule
  (row t for the transition of step t + 1) or a scalar / [b] constant. Returns the
  sizes used as step_sizes [T, b]. (Wu et al.'s code compares the running mean
  of all past accept decisions instead; it reacts late once the posterior
  narrows, and on a 1-D Gaussian toy left the weights three times as spread.)
  """
  betas = jnp.asarray(betas)
  if betas.ndim != 1 or betas.shape[0] < 2:
    raise ValueError(f"betas must be 1-D with at least 2 values, got shape {betas.shape}")
  leaves, treedef = jax.tree.flatten(z)
  batch, dtype = leaves[0].shape[0], leaves[0].dtype
  num_steps = betas.shape[0] - 1
  betas = betas.astype(dtype)
  sizes = jnp.asarray(step_size, dtype)
  if adapt and sizes.ndim > 1:
    raise ValueError("adapt=True takes an initial step size (scalar or [b]), not a schedule")
  sizes = jnp.broadcast_to(sizes, (num_steps, batch))
  sqnorm = lambda p: sum(jnp.sum(l.reshape(batch, -1) ** 2, axis=1) for l in jax.tree.leaves(p))

  def density_and_grad(z, beta):
    """f_beta per example, its two parts, and the gradient of f_beta (one backward pass)."""

    def total(z):
      l0, l1 = init_log_prob(z), log_target(z)
      f = (1 - beta) * l0 + beta * l1
      return jnp.sum(f), (f, l0, l1)

    (_, aux), grad = jax.value_and_grad(total, has_aux=True)(z)
    return aux, grad

  def step(carry, inputs):
    z, log_w, eps, accepted = carry
    key, beta_prev, beta, scheduled = inputs
    eps = eps if adapt else scheduled
    (f, l0, l1), grad = density_and_grad(z, beta)
    log_w = log_w + (beta - beta_prev) * (l1 - l0)

    # HMC with unit mass: num_leapfrog leapfrog steps, Metropolis accept per example.
    k_mom, k_acc = jax.random.split(key)
    momentum = treedef.unflatten(
      [
        jax.random.normal(k, l.shape, l.dtype)
        for k, l in zip(jax.random.split(k_mom, len(leaves)), leaves)
      ]
    )
    kick = lambda p, g, c: jax.tree.map(lambda p, g: p + c * _per_example(eps, p) * g, p, g)
    drift = lambda z, p: jax.tree.map(lambda z, p: z + _per_example(eps, z) * p, z, p)

    def leapfrog(_, state):
      z, p, _, grad = state
      z = drift(z, p)
      (f, _, _), grad = density_and_grad(z, beta)
      return z, kick(p, grad, 1.0), f, grad

    p = kick(momentum, grad, 0.5)
    z_new, p, f_new, grad_new = jax.lax.fori_loop(0, num_leapfrog, leapfrog, (z, p, f, grad))
    p = kick(p, grad_new, -0.5)  # the loop's last full kick was half a kick too many
    log_accept = (f_new - 0.5 * sqnorm(p)) - (f - 0.5 * sqnorm(momentum))
    log_accept = jnp.where(jnp.isnan(log_accept), -jnp.inf, log_accept)
    accept = jnp.log(jax.random.uniform(k_acc, (batch,), dtype)) < log_accept
    z = jax.tree.map(lambda new, old: jnp.where(_per_example(accept, new), new, old), z_new, z)

    new_eps = eps
    if adapt:
      up = jnp.exp(jnp.minimum(log_accept, 0.0)) > target_accept
      new_eps = jnp.clip(eps * jnp.where(up, _STEP_UP, _STEP_DOWN), _MIN_STEP, _MAX_STEP)
    return (z, log_w, new_eps.astype(dtype), accepted + accept), eps

  init = (z, jnp.zeros(batch, dtype), sizes[0], jnp.zeros(batch, dtype))
  inputs = (jax.random.split(key, num_steps), betas[:-1], betas[1:], sizes)
  (z, log_w, _, accepted), used = jax.lax.scan(step, init, inputs)
  return dict(log_w=log_w, accept_rate=accepted / num_steps, step_sizes=used, state=z)


def _tuned(key, z, init_log_prob, log_target, betas, num_leapfrog, step_size, target_accept, adapt):
  """_anneal with, when adapt, a pilot pass whose step sizes the returned pass replays."""
  if adapt:
    key, k_pilot = jax.random.split(key)
    step_size = _anneal(
      k_pilot, z, init_log_prob, log_target, betas, num_leapfrog, step_size, target_accept, True
    )["step_sizes"]
  return _anneal(
    key, z, init_log_prob, log_target, betas, num_leapfrog, step_size, target_accept, False
  )


def ais(
  key,
  init_sample,
  init_log_prob,
  log_target,
  betas,
  *,
  num_leapfrog=10,
  step_size=0.05,
  target_accept=0.65,
  adapt=True,
):
  """Annealed importance sampling (Neal, 2001): a stochastic lower bound of log Z per example.

  The chain starts at `init_sample`, an exact draw from the *normalized*
  initial density exp(init_log_prob) (typically the prior or the encoder's
  q(z|x)), and moves along the geometric path f_t = (1 - beta_t) init_log_prob +
  beta_t log_target (log space) to the unnormalized target, typically the joint
  log p(x, z), whose normalizer is Z = p(x). Each step adds f_t - f_{t-1} at the
  current state and then applies an HMC transition (unit mass, Metropolis
  accept per example) that leaves f_t invariant. The sum `log_z` is the log of an
  unbiased estimate of Z, so by Jensen E[log_z] <= log Z; the gap closes as the
  schedule gets finer (each step then an almost exact importance-sampling step
  between neighbouring distributions).

  Args:
    key: PRNG key.
    init_sample: pytree of leaves [b, ...] drawn from the initial distribution.
    init_log_prob: pytree -> [b], the normalized initial log density.
    log_target: pytree -> [b], the unnormalized target log density.
    betas: [T + 1] increasing from 0 to 1 (`sigmoid_schedule`,
      `linear_schedule`); T is static (the scan length).
    num_leapfrog: leapfrog steps per HMC transition.
    step_size: with adapt, the initial per-example step size (scalar or [b]);
      without, a scalar, [b], or a [T, b] schedule such as the `step_sizes` of
      an earlier run (row t for the transition at betas[t + 1]).
    target_accept, adapt: the posterior narrows by orders of magnitude along the
      path, so no fixed step size suits every beta. With adapt, a pilot pass
      (its own randomness, its weights discarded) multiplies each example's step
      size by 1.02 after every transition whose acceptance probability was
      above target_accept and by 0.98 otherwise, clipped to [1e-4, 0.5] (after
      Wu et al., 2017), and the estimate comes from a second pass that replays
      the pilot's step sizes. Adapting inside the weighted chain, as Wu
      et al. do, makes each transition depend on that chain's own past, which
      the unbiasedness argument does not allow: annealing N(0, 1) to
      N(0.5, 0.1^2) in 300 steps it inflated E[exp(log_z)] by 9%. The pilot
      starts from the same init_sample, a dependence that fades within its first
      few transitions (no bias was measurable on that toy, +-0.6%). Cost: twice
      the gradients.
  Returns:
    dict(log_z [b]; accept_rate [b]; step_sizes [T, b], the sizes used, to
    replay in `reverse_ais`; state: the final pytree, an approximate sample of
    the normalized target (the posterior)).

  With T = 1 (betas = [0, 1]) log_z is the one-sample importance weight
  log_target(z0) - init_log_prob(z0).
  """
  out = _tuned(
    key,
    init_sample,
    init_log_prob,
    log_target,
    betas,
    num_leapfrog,
    step_size,
    target_accept,
    adapt,
  )
  out["log_z"] = out.pop("log_w")
  return out


def ais_log_marginal(
  key,
  init_sample,
  init_log_prob,
  log_target,
  betas,
  num_chains,
  *,
  num_leapfrog=10,
  step_size=0.05,
  target_accept=0.65,
  adapt=True,
):
  """AIS with num_chains chains per example, combined by log-mean-exp.

  The chains are folded into the batch axis, chain-major: leaves of
  `init_sample` are [num_chains * b, ...], row c * b + i holding chain c of
  example i (independent draws from the initial distribution), and both
  densities are evaluated on that folded batch (so data x enter as
  jnp.tile(x, (num_chains, 1, ...))). Averaging the chains' unbiased estimates of
  Z before taking the log tightens the lower bound, as more samples tighten the
  importance-weighted bound. Keywords as in `ais`.

  Returns dict(log_z [b]; log_w [num_chains, b], the per-chain log weights, whose
  spread (and `psis_khat`, given enough chains) tells how far log_z can be
  trusted; accept_rate [num_chains, b]; step_sizes [T, num_chains * b]; state,
  the folded final pytree).
  """
  out = ais(
    key,
    init_sample,
    init_log_prob,
    log_target,
    betas,
    num_leapfrog=num_leapfrog,
    step_size=step_size,
    target_accept=target_accept,
    adapt=adapt,
  )
  log_w = out.pop("log_z").reshape(num_chains, -1)
  return dict(
    out,
    log_z=jax.nn.logsumexp(log_w, axis=0) - math.log(num_chains),
    log_w=log_w,
    accept_rate=out["accept_rate"].reshape(num_chains, -1),
  )


def reverse_ais(
  key,
  exact_sample,
  init_log_prob,
  log_target,
  betas,
  *,
  num_leapfrog=10,
  step_size=0.05,
  target_accept=0.65,
  adapt=True,
):
  """The reverse AIS chain of bidirectional Monte Carlo: a stochastic UPPER bound of log Z.

  Start at an exact sample of the normalized target (the posterior p(z|x) when
  log_target = log p(x, z)) and anneal backwards, beta = 1 -> 0, with the same
  HMC transitions as `ais`. The accumulated weight prod_t f_{t-1}(z) / f_t(z) is
  an unbiased estimate of 1/Z, so minus its log is, by Jensen, an upper bound of
  log Z in expectation (Grosse, Ghahramani & Adams, 2015).

  How it is used (BDMC): exact posterior samples are unavailable for real data,
  but not for data simulated from the model. Draw z ~ p(z), x ~ p(x|z): then z is
  an exact sample of p(z|x) for that x. Run `ais` from the initial distribution
  and `reverse_ais` from z on the same x with the same betas:
      E[ais log_z] <= log p(x) <= E[reverse_ais log_z],
  and the gap bounds the error of either. It shrinks to 0 as the schedule is
  refined, which tells how many steps AIS needs on data like x (Wu et al., 2017,
  certify decoder-based log-likelihoods this way); an approximate posterior
  sample guarantees nothing.

  Args and keywords as in `ais`, with `exact_sample` in place of `init_sample`;
  `betas` still increase from 0 to 1 and a [T, b] step_size schedule is still
  indexed by them (row t for betas[t + 1]): it is reversed here. Pass the forward
  run's `step_sizes` with adapt=False: the schedule then comes from chains
  independent of exact_sample, which the bound needs, and no pilot is run.
  Returns:
    dict(log_z [b], the upper bound; accept_rate [b]; step_sizes [T, b], in the
    forward order; state, the final pytree, approximately distributed as the
    initial distribution).
  """
  if (
    jnp.ndim(step_size) == 2
  ):  # reverse step j moves at betas[T - j]; the last move (beta 0) is idle
    step_size = jnp.concatenate([step_size[-2::-1], step_size[:1]])
  out = _tuned(
    key,
    exact_sample,
    init_log_prob,
    log_target,
    jnp.asarray(betas)[::-1],
    num_leapfrog,
    step_size,
    target_accept,
    adapt,
  )
  used = out["step_sizes"]
  out["step_sizes"] = jnp.concatenate([used[-2::-1], used[-1:]])
  out["log_z"] = -out.pop("log_w")
  return out
