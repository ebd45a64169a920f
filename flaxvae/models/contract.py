"""The model contract: the seam between models and everything else.

Losses, estimators, diagnostics, the trainer and the API see a model only through this.

A model is an `nnx.Module` built with a likelihood (objectives/likelihoods.py) and the data's
image shape. For a batch of preprocessed images x [b, H, W, C] and a `Noise` source that
knows the number of posterior samples k, `model.terms(x, noise)` returns `Terms`:

  log_px_z   [k, b]   log p(x | z) of each sample
  layers     one `LatentLayer` per stochastic layer, TOP FIRST (the layer the generative
             model starts from), each with, per sample and example:
     z        [k, b, *shape]  the reparameterized sample
     log_q    [k, b]          log q(z_l | ...) of the sample under the inference model
     log_p    [k, b]          log p(z_l | ...) under the generative model (learned priors too)
     kl       [k, b, units]   per-unit contributions whose sum estimates KL(q || p) for the
                              layer: analytic given the sampled ancestors where the family
                              allows it (lower variance), else log q - log p per unit
     q_mean   [k, b, units]   the posterior mean of the unit given the sampled ancestors (the
                              sample itself where no closed form exists): active units

So the ELBO of sample k is log_px_z - sum_l sum(kl_l) and its importance weight is
log_px_z + sum_l (log_p - log_q): objectives/bounds.py computes every loss and bound from
these generically, whatever the number of layers or the posterior family.

Every model also gives:
  log_joint(x, zs)              [b]  log p(x, z) at given latents (tuple, top first, [b, *shape])
  log_prior(zs)                 [b]  log p(z) at given latents
  prior_sample(key, n)          latents (tuple, top first, [n, *shape]) drawn from p(z)
  generate(zs)                  raw likelihood parameters of p(x | z) at given latents
  sample(key, n, temperature)   raw likelihood parameters [n, H, W, channels_out] from the prior,
                                temperature a float or one per layer (scales prior std devs)
  reconstruct(x, noise, keep_layers)  raw parameters with the top `keep_layers` layers taken from
                                q(z|x) and the rest sampled from the prior (VDVAE's latent grids)
  posterior_top(x, noise)       (mean, logvar) of the top layer's Gaussian q given sampled ancestors
  latent_shapes                 per-layer shapes (top first)

Capabilities a model may declare in `CAPABILITIES` (the evaluator skips a diagnostic that
needs one the model lacks, and says so in eval.json):
  "local_posterior"      encode_local(x) -> per-example variational parameters (a pytree of
                         [b, ...] arrays) and terms_given(x, local, noise): the amortization
                         gap optimises those parameters per example (Cremer et al. 2018)
  "aggregate_posterior"  one Gaussian layer and an N(0, I) prior, encode(x) -> (mean, logvar):
                         ELBO surgery's exact mixture q(z) over the evaluated examples
  "posterior_density"    log_posterior(x, zs) -> [b] log q(z|x) at given latents: AIS can start
                         from q instead of the prior
"""
from typing import NamedTuple, Protocol

import jax

LOCAL_POSTERIOR = "local_posterior"
AGGREGATE_POSTERIOR = "aggregate_posterior"
POSTERIOR_DENSITY = "posterior_density"


class Noise(Protocol):
  """Standard-normal noise for the posterior samples, keyed by whoever owns the randomness.

  `normal(layer, shape)` returns [num_samples, batch, *shape]; the trainer draws it per global
  batch (device-count invariant), evaluation per example id (subset invariant).
  """
  num_samples: int

  def normal(self, layer: int, shape: tuple) -> jax.Array: ...


class LatentLayer(NamedTuple):
  z: jax.Array
  log_q: jax.Array
  log_p: jax.Array
  kl: jax.Array
  q_mean: jax.Array


class Terms(NamedTuple):
  log_px_z: jax.Array
  layers: tuple

  @property
  def num_samples(self):
    return self.log_px_z.shape[0]


def has(model, capability):
  return capability in getattr(model, "CAPABILITIES", ())
