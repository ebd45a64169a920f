"""Posterior diagnostics as pure per-device functions: log p(x), ELBO surgery, the amortization gap.

The ELBO can be read two ways:
    ELBO = E_q[log p(x|z)] - KL(q(z|x) || p(z))       (rate: distance to the prior)
         = log p(x)        - KL(q(z|x) || p(z|x))     (inference gap: distance to the posterior)
These functions estimate every term per example so that both distances can be tracked during
training, for any model of the contract (models/contract.py); the diagnostics that need more
than the contract check the model's capabilities. Each `*_fn` returns a per-device function
`fn(params, rng, rows, example_ids) -> {name: [batch, ...]}` for `evaluator.Evaluator`.

Randomness is keyed per example id and per sample index, never per device or chunk: results
do not depend on the device count or chunk size, and the first K samples of a larger K are
the same draws (so log_px grows with K on average).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flaxvae.data import protocols
from flaxvae.models import contract
from flaxvae.models.noise import NoiseSource
from flaxvae.objectives import bounds, estimators, gaussian

# Streams folded into an example's key for the diagnostics' own draws.
IMPORTANCE_STREAM, AGGREGATE_STREAM, AMORTIZATION_STREAM, AMORTIZED_ELBO_STREAM = 2, 3, 4, 5
AIS_STREAM, BDMC_STREAM = 6, 7
ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. (2016)
TARGET_ROWS = 4096  # decoder rows per device per chunk: big matmuls whose logits stay in cache
UNRELIABLE_KHAT = 0.7  # Pareto k-hat above this: the importance estimate is not to be trusted


def example_keys(rng, example_ids):
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.wrap_key_data(rng), i))(example_ids)


def stream_keys(keys, stream):
  return jax.vmap(lambda k: jax.random.fold_in(k, stream))(keys)


def per_example_inputs(graphdef, protocol, params, rng, images, ids):
  """What each per-example diagnostic starts from: the model with `params`, the examples as the
  model scores them (the data protocol's targets) and each example's key, by id."""
  return (
    nnx.merge(graphdef, params),
    protocols.eval_targets(images, ids, protocol),
    example_keys(rng, ids),
  )


def chunk_size(num_samples, examples_per_device):
  return max(1, min(num_samples, TARGET_ROWS // max(1, examples_per_device)))


def chunk_partials(terms_of, keys, index, num_samples):
  """Sums over the samples `index` [n] of one chunk, per example: the logsumexp and the sum of
  the log weights, log p(x|z), each layer's KL and posterior mean, and the weights themselves
  ([n, batch]; -inf for indices past num_samples)."""
  terms = terms_of(NoiseSource.per_example(keys, index))
  valid = (index < num_samples)[:, None]
  log_w = jnp.where(valid, bounds.log_weights(terms), -jnp.inf)
  zero = lambda v: jnp.where(valid.reshape(valid.shape + (1,) * (v.ndim - 2)), v, 0.0)
  kls = jnp.stack([bounds.layer_kl(layer) for layer in terms.layers], -1)  # [n, b, L]
  return dict(
    lse=jax.nn.logsumexp(log_w, 0),
    log_w_sum=jnp.sum(zero(log_w), 0),
    log_px_z=jnp.sum(zero(terms.log_px_z), 0),
    rate_by_layer=jnp.sum(zero(kls), 0),
    q_mean=tuple(jnp.sum(zero(l.q_mean.reshape(*l.q_mean.shape[:2], -1)), 0) for l in terms.layers),
    log_w=log_w,
  )


def finish(partials, num_samples):
  """The importance figures from the sums over every chunk (see importance_pass)."""
  return dict(
    iwae=partials["lse"] - math.log(num_samples),
    elbo=partials["log_w_sum"] / num_samples,
    distortion=-partials["log_px_z"] / num_samples,
    rate_by_layer=partials["rate_by_layer"] / num_samples,
    q_mean=tuple(m / num_samples for m in partials["q_mean"]),
  )


def first_chunk(part, num_samples):
  """The running total of a batch's chunks (importance_chunk_fn's partials, weights on the last
  axis) after its first: the weights placed in a buffer for all `num_samples` (-inf beyond)."""
  log_w = part["log_w"]  # padded, not written into a new buffer: it keeps log_w's sharding
  pad = [(0, 0)] * (log_w.ndim - 1) + [(0, num_samples - log_w.shape[-1])]
  return dict(part, log_w=jnp.pad(log_w, pad, constant_values=-jnp.inf))


def merge_chunk(total, part, offset):
  """`total` (first_chunk) with the partials of the chunk whose first sample is `offset`:
  sums added, logsumexps combined, weights written in place (donate `total`)."""
  out = {k: total[k] + part[k] for k in ("log_w_sum", "log_px_z", "rate_by_layer")}
  out["lse"] = jnp.logaddexp(total["lse"], part["lse"])
  out["q_mean"] = tuple(a + b for a, b in zip(total["q_mean"], part["q_mean"]))
  out["log_w"] = jax.lax.dynamic_update_slice_in_dim(total["log_w"], part["log_w"], offset, axis=-1)
  return out


def importance_pass(terms_of, x, keys, num_samples, chunk=None, keep_log_w=False):
  """log p(x) >= IWAE_K, the K-sample ELBO and per-layer figures, per example, from K draws.

  `terms_of(noise)` gives the model's Terms for a NoiseSource.per_example. Samples are drawn
  and scored `chunk` at a time in a lax.scan that keeps a running logsumexp, so memory does not
  grow with K (unless `keep_log_w`, which returns every log weight [K, batch] for Pareto k-hat).
  Sample k of an example uses key fold_in(key, k). Returns a dict of [batch] arrays (and
  [batch, L] / [batch, units] per layer): iwae = log mean_k w_k and elbo = mean_k log w_k with
  w = p(x, z)/q(z|x), so iwae >= elbo on every example (Jensen), equal when K = 1.
  (Convolutional models on XLA:CPU, where a rolled loop is slow, dispatch the chunks from the
  host instead: `importance_chunk_fn`, `first_chunk` and `merge_chunk`, with the same draws
  and sums.)
  """
  batch = x.shape[0]
  chunk = chunk or chunk_size(num_samples, batch)
  num_chunks = -(-num_samples // chunk)
  first = jax.eval_shape(lambda: chunk_partials(terms_of, keys, jnp.arange(chunk), num_samples))
  zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), first)
  zeros["lse"] = jnp.full((batch,), -jnp.inf, jnp.float32)
  del zeros["log_w"]

  def body(carry, c):
    part = chunk_partials(terms_of, keys, c * chunk + jnp.arange(chunk), num_samples)
    log_w = part.pop("log_w")
    lse = jnp.logaddexp(carry.pop("lse"), part.pop("lse"))
    return dict(jax.tree.map(jnp.add, carry, part), lse=lse), (log_w if keep_log_w else None)

  sums, all_log_w = jax.lax.scan(body, zeros, jnp.arange(num_chunks))
  out = finish(sums, num_samples)
  if keep_log_w:
    out["log_w"] = all_log_w.reshape(-1, batch)[:num_samples]
  return out


def _terms_of(model, x):
  if contract.has(model, contract.LOCAL_POSTERIOR):  # encode once, not once per chunk
    local = model.encode_local(x)
    return lambda noise: model.terms_given(x, local, noise)
  return lambda noise: model.terms(x, noise)


def importance_fn(graphdef, protocol, num_samples):
  """Per example: log_px (IWAE with K samples), the K-sample elbo, rate (total and by layer),
  distortion, the inference gap, Pareto k-hat of the K weights, and E_q[z] per layer.

  `elbo` is mean_k log w_k over the same draws as log_px, so inference_gap = log_px - elbo is
  >= 0 on every example and -> KL(q(z|x) || p(z|x)) as K grows (IWAE_K approaches log p(x)
  from below, so for finite K it underestimates the gap). `khat` > 0.7 flags an example whose
  weights are too heavy-tailed for the estimate to be trusted (Vehtari et al.).
  """

  def fn(params, rng, images, ids):
    model, x, keys = per_example_inputs(graphdef, protocol, params, rng, images, ids)
    out = importance_pass(
      _terms_of(model, x), x, stream_keys(keys, IMPORTANCE_STREAM), num_samples, keep_log_w=True
    )
    return importance_row(out, estimators.psis_khat(out.pop("log_w")))

  return fn


def importance_chunk_fn(graphdef, protocol, num_samples, chunk):
  """Per example, the partial sums of one chunk of samples: fn(params, rng, images, ids,
  chunk_index). Dispatched chunk by chunk from the host and merged on the devices as they come
  (first_chunk, merge_chunk): the same figures as
  importance_fn without a loop on the device (convolutions in rolled loops are slow on CPU)."""

  def fn(params, rng, images, ids, chunk_index):
    model, x, keys = per_example_inputs(graphdef, protocol, params, rng, images, ids)
    part = chunk_partials(
      _terms_of(model, x),
      stream_keys(keys, IMPORTANCE_STREAM),
      chunk_index * chunk + jnp.arange(chunk),
      num_samples,
    )
    part["log_w"] = part["log_w"].T  # [batch, n]: the evaluator splits batches on axis 0
    return part

  return fn


def importance_row(out, khat):
  """The per-example figures of importance_fn from importance_pass's output."""
  rate_by_layer = out["rate_by_layer"]
  return dict(
    log_px=out["iwae"],
    elbo=out["elbo"],
    rate=rate_by_layer.sum(-1),
    rate_by_layer=rate_by_layer,
    distortion=out["distortion"],
    inference_gap=out["iwae"] - out["elbo"],
    khat=khat,
    **{f"q_mean_{i}": m for i, m in enumerate(out["q_mean"])},
  )


def log_mixture_density(z, means, logvars, chunk=1024):
  """log q(z) for the mixture (1/N) sum_n N(z; means[n], exp(logvars[n])), for z [m, latent].

  Exact over all N components (a scan over chunks of components with a running
  logsumexp); the direct (z - mean)^2 form avoids the cancellation of a matmul form.
  """
  n, latent = means.shape
  num_chunks = -(-n // chunk)
  pad = num_chunks * chunk - n
  means = jnp.pad(means, ((0, pad), (0, 0))).reshape(num_chunks, chunk, latent)
  logvars = jnp.pad(logvars, ((0, pad), (0, 0))).reshape(num_chunks, chunk, latent)
  valid = (jnp.arange(num_chunks * chunk) < n).reshape(num_chunks, chunk)

  def body(acc, part):
    m, lv, ok = part
    log_q = gaussian.log_normal(z[:, None, :], m[None], lv[None])  # [m, chunk]
    return jnp.logaddexp(acc, jax.nn.logsumexp(jnp.where(ok[None], log_q, -jnp.inf), axis=1)), None

  acc, _ = jax.lax.scan(body, jnp.full(z.shape[:1], -jnp.inf, jnp.float32), (means, logvars, valid))
  return acc - math.log(n)


def posterior_fn(graphdef, protocol):
  """Per example: the Gaussian q(z|x) as (mean, logvar): the input of ELBO surgery."""

  def fn(params, rng, images, ids):
    model, x, _ = per_example_inputs(graphdef, protocol, params, rng, images, ids)
    mean, logvar = model.encode(x)
    return dict(mean=mean, logvar=logvar)

  return fn


def aggregate_fn(num_samples=1):
  """ELBO surgery (Hoffman & Johnson 2016): rate = mutual_info + marginal_kl, per example.

  Needs the model capability "aggregate_posterior" (one Gaussian layer, N(0, I) prior). The
  aggregate posterior is the mixture q(z) = (1/N) sum_n q(z|x_n) over the N evaluated
  examples (the empirical data distribution), evaluated exactly. Each example contributes
  `num_samples` draws z ~ q(z|x_n), a stratified sample of q(z) with equal strata, giving
  the unbiased per-example estimate
      marginal_kl_n = mean_s [log q(z_s) - log p(z_s)],
  and mutual_info_n = rate_n - marginal_kl_n, whose mean is unbiased for
  I_q(x; z) = E_x E_q[log q(z|x) - log q(z)] because E_q[log q(z|x) - log p(z)] is
  the analytic rate_n (a control variate; the sum equals the rate exactly).
  Bias: these are the figures for the N-point data distribution, not the
  population: I_q(x; z) <= log N, so with few examples the mutual information is
  capped at log N and the marginal KL absorbs the rest. Standard errors treat the
  examples as independent, ignoring their coupling through q(z).

  `posteriors` (replicated) is (means [N, latent], logvars [N, latent]); `rows`
  are this device's examples as [batch, 2, latent] (mean, logvar) pairs.
  """

  def fn(posteriors, rng, rows, ids):
    all_means, all_logvars = posteriors
    mean, logvar = rows[:, 0], rows[:, 1]
    keys = stream_keys(example_keys(rng, ids), AGGREGATE_STREAM)
    eps = jax.vmap(lambda k: jax.random.normal(k, (num_samples, mean.shape[-1])))(keys)
    z = mean[:, None] + jnp.exp(0.5 * logvar)[:, None] * eps  # [batch, s, latent]
    flat = z.reshape(-1, z.shape[-1])
    log_q = log_mixture_density(flat, all_means, all_logvars).reshape(z.shape[:2])
    marginal_kl = jnp.mean(log_q - gaussian.log_standard_normal(z), axis=1)
    rate = gaussian.kl_to_standard(mean, logvar)
    return dict(mutual_info=rate - marginal_kl, marginal_kl=marginal_kl)

  return fn


def active_units(means, threshold=ACTIVE_UNIT_THRESHOLD, num_bootstrap=200, seed=0):
  """Latent units whose Cov_x(E_q[z]) > threshold, with a bootstrap standard error over examples."""
  means = np.asarray(means, np.float64).reshape(len(means), -1)
  count = int(np.sum(np.var(means, axis=0) > threshold))
  rng = np.random.default_rng(seed)
  n = len(means)
  counts = [
    np.sum(np.var(means[rng.integers(0, n, n)], axis=0) > threshold)
    for _ in range(num_bootstrap if n > 1 else 0)
  ]
  return count, float(np.std(counts, ddof=1)) if len(counts) > 1 else 0.0


def amortization_fn(
  graphdef, protocol, num_steps, learning_rate, num_train_samples=1, num_eval_samples=1000
):
  """Per example: the ELBO of the encoder's q and of q* optimized for that example alone.

  Needs the model capability "local_posterior". Cremer, Li & Duvenaud (2018): starting from
  the encoder's per-example variational parameters (a Gaussian's mean and logvar; an IAF's
  also its context), Adam maximizes the example's own ELBO for `num_steps` steps
  (reparameterized, `num_train_samples` draws per step, the decoder fixed, the learning rate
  cosine-decayed to 0 so q* settles instead of jittering with the gradient noise). Adam is
  elementwise and the examples' ELBOs are independent, so one Adam on the batch sum is
  per-example Adam. Both ELBOs are then estimated with the same `num_eval_samples` draws, so
  their difference (the amortization gap) has little noise.
  """

  def fn(params, rng, images, ids):
    model, x, keys = per_example_inputs(graphdef, protocol, params, rng, images, ids)
    encoder_q = model.encode_local(x)
    train_keys = stream_keys(keys, AMORTIZATION_STREAM)
    eval_keys = stream_keys(keys, AMORTIZED_ELBO_STREAM)

    def elbo(q, sample_keys, num_samples, chunk=None):
      return importance_pass(
        lambda noise: model.terms_given(x, q, noise), x, sample_keys, num_samples, chunk
      )["elbo"]

    def negative_elbo(q, step):
      step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(train_keys)
      return -jnp.sum(elbo(q, step_keys, num_train_samples, chunk=num_train_samples))

    tx = optax.adam(optax.cosine_decay_schedule(learning_rate, max(1, num_steps)))

    def body(carry, step):
      q, opt_state = carry
      grads = jax.grad(negative_elbo)(q, step)
      updates, opt_state = tx.update(grads, opt_state, q)
      return (optax.apply_updates(q, updates), opt_state), None

    (optimized_q, _), _ = jax.lax.scan(body, (encoder_q, tx.init(encoder_q)), jnp.arange(num_steps))
    return dict(
      elbo_encoder=elbo(encoder_q, eval_keys, num_eval_samples),
      elbo_optimized=elbo(optimized_q, eval_keys, num_eval_samples),
    )

  return fn


# ----------------------------------------------------------------------------
# AIS and BDMC: log p(x) by annealing, for any model of the contract
# ----------------------------------------------------------------------------
def _ais_start(model, x, key, num_chains, init):
  """(first latents [chains, ...], their normalized log density) for AIS on one example x
  [1, H, W, C]: q(z|x) when the model has a posterior density and init allows, else p(z)."""
  xc = jnp.broadcast_to(x, (num_chains, *x.shape[1:]))
  use_q = init == "posterior" or (
    init == "auto" and contract.has(model, contract.POSTERIOR_DENSITY)
  )
  if use_q:
    noise = NoiseSource.per_example(jax.random.split(key, num_chains), jnp.arange(1))
    terms = model.terms(xc, noise)
    return tuple(layer.z[0] for layer in terms.layers), lambda zs: model.log_posterior(xc, zs)
  return model.prior_sample(key, num_chains), model.log_prior


def ais_fn(graphdef, protocol, num_steps, num_chains, num_leapfrog, init="auto"):
  """Per example: log p(x) by AIS (Neal 2001; Wu et al. 2017's protocol for decoder-based
  models): `num_chains` chains per example annealed over `num_steps` geometric steps
  (sigmoid schedule) from q(z|x) (or p(z)) to p(x, z) with HMC transitions whose step size
  is adapted towards an acceptance rate; the chains' estimates of p(x) are averaged before
  the log. A stochastic lower bound of log p(x), far tighter than IWAE for the same compute
  where the posterior is multimodal or heavy-tailed. Keyed per example id."""

  def fn(params, rng, images, ids):
    model, x, keys = per_example_inputs(graphdef, protocol, params, rng, images, ids)
    return ais_log_px(
      model, x, stream_keys(keys, AIS_STREAM), num_steps, num_chains, num_leapfrog, init
    )

  return fn


def ais_log_px(model, x, keys, num_steps, num_chains, num_leapfrog, init="auto"):
  """AIS log p(x) of each preprocessed example x [b, ...], example i keyed by keys[i]."""
  betas = jnp.asarray(estimators.sigmoid_schedule(num_steps), jnp.float32)

  def one(key, x1):
    x1 = x1[None]
    start_key, run_key = jax.random.split(key)
    z0, init_log_prob = _ais_start(model, x1, start_key, num_chains, init)
    xc = jnp.broadcast_to(x1, (num_chains, *x1.shape[1:]))
    out = estimators.ais_log_marginal(
      run_key,
      z0,
      init_log_prob,
      lambda zs: model.log_joint(xc, zs),
      betas,
      num_chains,
      num_leapfrog=num_leapfrog,
    )
    return out["log_z"][0], jnp.mean(out["accept_rate"])

  log_px, accept = jax.vmap(one)(keys, x)
  return dict(log_px_ais=log_px, ais_accept_rate=accept)


def bdmc_fn(graphdef, num_steps, num_leapfrog, init="auto"):
  """Bidirectional Monte Carlo (Grosse et al. 2015) on data simulated from the model: per
  simulated example (id), z ~ p(z), x ~ p(x|z); forward AIS from q (or p) gives a stochastic
  lower bound of log p(x), and the reverse chain started at the exact posterior sample z a
  stochastic upper bound. Their gap bounds the AIS error on data like the model's own."""
  betas = jnp.asarray(estimators.sigmoid_schedule(num_steps), jnp.float32)

  def fn(params, rng, ids_as_rows, ids):
    model = nnx.merge(graphdef, params)
    keys = stream_keys(example_keys(rng, ids), BDMC_STREAM)

    def one(key):
      k_z, k_x, k_start, k_fwd, k_rev = jax.random.split(key, 5)
      z = model.prior_sample(k_z, 1)
      x = model.likelihood.sample(k_x, model.generate(z))
      z0, init_log_prob = _ais_start(model, x, k_start, 1, init)
      log_target = lambda zs: model.log_joint(x, zs)
      forward = estimators.ais(
        k_fwd, z0, init_log_prob, log_target, betas, num_leapfrog=num_leapfrog
      )
      reverse = estimators.reverse_ais(
        k_rev,
        z,
        init_log_prob,
        log_target,
        betas,
        num_leapfrog=num_leapfrog,
        step_size=forward["step_sizes"],
        adapt=False,
      )
      return forward["log_z"][0], reverse["log_z"][0]

    lower, upper = jax.vmap(one)(keys)
    return dict(bdmc_lower=lower, bdmc_upper=upper, bdmc_gap=upper - lower)

  return fn
