"""Posterior diagnostics as pure per-device functions: log p(x), ELBO surgery, the amortization gap.

The ELBO can be read two ways:
    ELBO = E_q[log p(x|z)] - KL(q(z|x) || p(z))       (rate: distance to the prior)
         = log p(x)        - KL(q(z|x) || p(z|x))     (inference gap: distance to the posterior)
These functions estimate every term per example so that both distances can be
tracked during training. Each `*_fn` returns a per-device function
`fn(params, rng, rows, example_ids) -> {name: [batch]}` for `evaluate.Evaluator`.

Randomness is keyed per example id and per sample index, never per device or
chunk: results do not depend on the device count or chunk size, and the first K
samples of a larger K are the same draws (so log_px grows with K on average).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flaxvae import losses
from flaxvae import step as step_lib

# Streams folded into an example's key: 0 binarization and 1 the one-sample ELBO
# (both as step.eval_terms), then the diagnostics' own draws.
IMPORTANCE_STREAM, AGGREGATE_STREAM, AMORTIZATION_STREAM, AMORTIZED_ELBO_STREAM = 2, 3, 4, 5
ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. (2016)
TARGET_ROWS = 4096  # decoder rows per device per chunk: big matmuls whose logits stay in cache


def example_keys(rng, example_ids):
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.wrap_key_data(rng), i))(example_ids)


def preprocessed(images, keys, binarization):
  """The inputs evaluation scores: the same draw of dynamic binarization as step.eval_terms."""
  return step_lib.preprocess(images, jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys),
                             binarization)


def chunk_size(num_samples, examples_per_device):
  return max(1, min(num_samples, TARGET_ROWS // max(1, examples_per_device)))


def importance_bounds(decode, likelihood, x, mean, logvar, keys, num_samples, chunk=None):
  """log p(x) >= IWAE_K and the K-sample ELBO, per example, from the same K draws.

  Samples are drawn and decoded `chunk` at a time in a lax.scan that keeps a
  running logsumexp, so memory does not grow with K. Sample k of an example uses
  key fold_in(key, k). Returns (iwae, elbo, mean_log_px_z), each [batch]: iwae =
  log mean_k w_k and elbo = mean_k log w_k with w = p(x, z)/q(z|x), so iwae >= elbo
  on every example (Jensen), and both equal log w_1 when K = 1.
  """
  batch, latent = mean.shape
  chunk = chunk or chunk_size(num_samples, batch)
  num_chunks = -(-num_samples // chunk)

  def body(carry, c):
    log_sum_w, sum_log_w, sum_log_px_z = carry
    index = c * chunk + jnp.arange(chunk)
    eps = jax.vmap(lambda k: jax.vmap(
        lambda i: jax.random.normal(jax.random.fold_in(k, i), (latent,)))(index))(keys)
    z = mean[None] + jnp.exp(0.5 * logvar)[None] * jnp.swapaxes(eps, 0, 1)  # [chunk, b, latent]
    log_px_z = losses.sample_log_prob(likelihood, decode(z.reshape(-1, latent)), x)  # [chunk, b]
    log_w = log_px_z + losses.log_standard_normal(z) - losses.log_normal(z, mean, logvar)
    valid = (index < num_samples)[:, None]
    log_sum_w = jnp.logaddexp(log_sum_w, jax.nn.logsumexp(jnp.where(valid, log_w, -jnp.inf), 0))
    sum_log_w += jnp.sum(jnp.where(valid, log_w, 0.0), 0)
    sum_log_px_z += jnp.sum(jnp.where(valid, log_px_z, 0.0), 0)
    return (log_sum_w, sum_log_w, sum_log_px_z), None

  zeros = jnp.zeros((batch,), jnp.float32)
  init = (jnp.full((batch,), -jnp.inf, jnp.float32), zeros, zeros)
  (log_sum_w, sum_log_w, sum_log_px_z), _ = jax.lax.scan(body, init, jnp.arange(num_chunks))
  return (log_sum_w - math.log(num_samples), sum_log_w / num_samples,
          sum_log_px_z / num_samples)


def importance_fn(graphdef, step_cfg, num_samples):
  """Per example: log_px (IWAE with K samples), the K-sample elbo, rate, distortion, and q(z|x).

  `elbo` is mean_k log w_k over the same draws as log_px, so inference_gap =
  log_px - elbo is >= 0 on every example and -> KL(q(z|x) || p(z|x)) as K grows
  (IWAE_K approaches log p(x) from below, so for finite K it underestimates the
  gap, by roughly Var(w)/(2K E[w]^2)). `rate` is the analytic KL to the prior and
  `distortion` = -mean_k log p(x|z_k), so elbo = -(rate + distortion) up to the
  Monte Carlo error of the K-sample KL.
  """
  def fn(params, rng, images, ids):
    model = nnx.merge(graphdef, params)
    keys = example_keys(rng, ids)
    x = preprocessed(images, keys, step_cfg.binarization)
    mean, logvar = model.encode(x)
    sample_keys = jax.vmap(lambda k: jax.random.fold_in(k, IMPORTANCE_STREAM))(keys)
    log_px, elbo, log_px_z = importance_bounds(model.decode, step_cfg.likelihood, x, mean, logvar,
                                               sample_keys, num_samples)
    return dict(log_px=log_px, elbo=elbo, rate=losses.gaussian_kl(mean, logvar),
                distortion=-log_px_z, inference_gap=log_px - elbo, mean=mean, logvar=logvar)
  return fn


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
    log_q = losses.log_normal(z[:, None, :], m[None], lv[None])  # [m, chunk]
    return jnp.logaddexp(acc, jax.nn.logsumexp(jnp.where(ok[None], log_q, -jnp.inf), axis=1)), None

  acc, _ = jax.lax.scan(body, jnp.full(z.shape[:1], -jnp.inf, jnp.float32), (means, logvars, valid))
  return acc - math.log(n)


def aggregate_fn(num_samples=1):
  """ELBO surgery (Hoffman & Johnson 2016): rate = mutual_info + marginal_kl, per example.

  The aggregate posterior is the mixture q(z) = (1/N) sum_n q(z|x_n) over the N
  evaluated examples (the empirical data distribution), evaluated exactly. Each
  example contributes `num_samples` draws z ~ q(z|x_n), a stratified sample of
  q(z) with equal strata, giving the unbiased per-example estimate
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
    keys = jax.vmap(lambda k: jax.random.fold_in(k, AGGREGATE_STREAM))(example_keys(rng, ids))
    eps = jax.vmap(lambda k: jax.random.normal(k, (num_samples, mean.shape[-1])))(keys)
    z = mean[:, None] + jnp.exp(0.5 * logvar)[:, None] * eps  # [batch, s, latent]
    flat = z.reshape(-1, z.shape[-1])
    log_q = log_mixture_density(flat, all_means, all_logvars).reshape(z.shape[:2])
    marginal_kl = jnp.mean(log_q - losses.log_standard_normal(z), axis=1)
    rate = losses.gaussian_kl(mean, logvar)
    return dict(mutual_info=rate - marginal_kl, marginal_kl=marginal_kl)
  return fn


def active_units(means, threshold=ACTIVE_UNIT_THRESHOLD, num_bootstrap=200, seed=0):
  """Latent dims whose Cov_x(E_q[z]) > threshold, with a bootstrap standard error over examples."""
  means = np.asarray(means, np.float64)
  count = int(np.sum(np.var(means, axis=0) > threshold))
  rng = np.random.default_rng(seed)
  n = len(means)
  counts = [np.sum(np.var(means[rng.integers(0, n, n)], axis=0) > threshold)
            for _ in range(num_bootstrap if n > 1 else 0)]
  return count, float(np.std(counts, ddof=1)) if len(counts) > 1 else 0.0


def amortization_fn(graphdef, step_cfg, num_steps, learning_rate, num_train_samples=1,
                    num_eval_samples=1000):
  """Per example: the ELBO of the encoder's q and of q* optimized for that example alone.

  Cremer, Li & Duvenaud (2018): starting from the encoder's (mean, logvar), Adam
  maximizes the example's own ELBO for `num_steps` steps (reparameterized,
  `num_train_samples` draws per step, the decoder fixed, the learning rate
  cosine-decayed to 0 so q* settles instead of jittering with the gradient
  noise). Adam is elementwise and the examples' ELBOs are independent, so one
  Adam on the batch sum is per-example Adam. Both ELBOs are then estimated with
  the same `num_eval_samples` draws, so their difference (the amortization gap)
  has little noise.
  """
  def fn(params, rng, images, ids):
    model = nnx.merge(graphdef, params)
    keys = example_keys(rng, ids)
    x = preprocessed(images, keys, step_cfg.binarization)
    encoder_q = model.encode(x)
    train_keys = jax.vmap(lambda k: jax.random.fold_in(k, AMORTIZATION_STREAM))(keys)
    eval_keys = jax.vmap(lambda k: jax.random.fold_in(k, AMORTIZED_ELBO_STREAM))(keys)

    def negative_elbo(q, step):
      step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(train_keys)
      _, elbo, _ = importance_bounds(model.decode, step_cfg.likelihood, x, *q, step_keys,
                                     num_train_samples, chunk=num_train_samples)
      return -jnp.sum(elbo)

    tx = optax.adam(optax.cosine_decay_schedule(learning_rate, max(1, num_steps)))

    def body(carry, step):
      q, opt_state = carry
      grads = jax.grad(negative_elbo)(q, step)
      updates, opt_state = tx.update(grads, opt_state, q)
      return (optax.apply_updates(q, updates), opt_state), None

    (optimized_q, _), _ = jax.lax.scan(body, (encoder_q, tx.init(encoder_q)), jnp.arange(num_steps))

    def elbo(q):
      return importance_bounds(model.decode, step_cfg.likelihood, x, *q, eval_keys,
                               num_eval_samples)[1]
    return dict(elbo_encoder=elbo(encoder_q), elbo_optimized=elbo(optimized_q))
  return fn
