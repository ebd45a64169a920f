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

Every model gives the methods of `VAE` below, and may declare optional capabilities in
`CAPABILITIES` (the evaluator skips a diagnostic that needs one the model lacks, and says so
in eval.json); each capability needs the methods of its protocol:
  "local_posterior"      `LocalPosterior`: the amortization gap optimises the per-example
                         variational parameters (Cremer et al. 2018)
  "aggregate_posterior"  `AggregatePosterior`: one Gaussian layer and an N(0, I) prior, for
                         ELBO surgery's exact mixture q(z) over the evaluated examples
  "posterior_density"    `PosteriorDensity`: AIS can start from q instead of the prior
  "reconstruction"       `Reconstructs`: a convolutional autoencoder trained on its
                         reconstructions (perceptual and adversarial terms, LDM's adaptive
                         weight at the decoder's last layer)

The registry checks a model class against these when it registers (`check_model_class`), so a
model that lacks a method fails on import with one line, not in the middle of an evaluation.
The check reads the class, not an instance: `latent_shapes` must be a property (or a class
attribute), not an attribute set in `__init__`. A model may narrow its class's capabilities per
instance (an IAF posterior has no closed form); `capabilities(model)` reads them.
"""

from typing import NamedTuple, Protocol

import jax

from flaxvae.errors import ModelContractError

LOCAL_POSTERIOR = "local_posterior"
AGGREGATE_POSTERIOR = "aggregate_posterior"
POSTERIOR_DENSITY = "posterior_density"
RECONSTRUCTION = "reconstruction"


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


class VAE(Protocol):
  """The methods every model gives; latents are tuples with one array per layer, top first."""

  likelihood: object  # objectives/likelihoods.py: p(x | z) from the raw parameters

  @property
  def latent_shapes(self) -> tuple:
    """Per-layer shapes of the latents, top first: a property or class attribute, which the
    registry's check of the class can see (one set in `__init__` fails registration)."""

  def terms(self, x, noise: Noise) -> Terms:
    """The per-sample terms of `noise.num_samples` posterior samples (see the module doc)."""

  def log_joint(self, x, zs) -> jax.Array:
    """[b] log p(x, z) at given latents ([b, *shape] each)."""

  def log_prior(self, zs) -> jax.Array:
    """[b] log p(z) at given latents: the model's own prior, learned and hierarchical too."""

  def prior_sample(self, key, n) -> tuple:
    """Latents ([n, *shape] each) drawn from p(z)."""

  def generate(self, zs) -> jax.Array:
    """Raw likelihood parameters of p(x | z) at given latents."""

  def sample(self, key, n, temperature=1.0) -> jax.Array:
    """Raw likelihood parameters [n, H, W, channels_out] from the prior, whose standard
    deviations are scaled by `temperature` (a float, or one per layer)."""

  def reconstruct(self, x, noise: Noise, keep_layers) -> jax.Array:
    """Raw parameters with the top `keep_layers` layers taken from q(z|x) and the rest sampled
    from the prior (VDVAE's latent-level grids)."""


class LocalPosterior(Protocol):
  def encode_local(self, x):
    """Per-example variational parameters: a pytree of [b, ...] arrays."""

  def terms_given(self, x, local, noise: Noise) -> Terms:
    """`terms` with the variational parameters given instead of encoded."""


class AggregatePosterior(Protocol):
  def encode(self, x) -> tuple:
    """(mean, logvar) [b, latent] of the one Gaussian layer's q(z|x)."""

  def decode(self, z) -> jax.Array:
    """Raw likelihood parameters for latents [n, latent]."""


class PosteriorDensity(Protocol):
  def log_posterior(self, x, zs) -> jax.Array:
    """[b] log q(z|x) at given latents."""


class Reconstruction(NamedTuple):
  """One posterior sample's reconstruction, with what the losses on images need.

  raw       [b, H, W, channels_out] raw likelihood parameters of p(x | z), z ~ q(z|x)
  layers    (LatentLayer,) as in `Terms` (arrays [1, b, ...]): the rate
  features  [b, H', W', F] the input of the decoder's last layer (`OUTPUT_LAYER`), so that
            raw == model.output_layer(params at OUTPUT_LAYER, features)
  """

  raw: jax.Array
  layers: tuple
  features: jax.Array


class Reconstructs(Protocol):
  """An autoencoder with a convolutional latent [b, h, w, c]: encode, decode, and one
  reconstruction whose last layer can be re-applied to its own parameters (the gradient of a
  loss with respect to that layer's kernel: LDM's adaptive discriminator weight)."""

  OUTPUT_LAYER: tuple | None = None  # the path of the last layer in the pure parameter dict

  def encode(self, x) -> tuple:
    """(mean, logvar) [b, h, w, c] of q(z|x) for images x [b, H, W, C] in [0, 1]."""

  def decode(self, z) -> jax.Array:
    """Raw likelihood parameters [b, H, W, channels_out] for latents [b, h, w, c]."""

  def reconstruct_for_training(self, x, noise: Noise) -> Reconstruction:
    """The reconstruction of one posterior sample (noise.num_samples == 1)."""

  def output_layer(self, params, features) -> jax.Array:
    """raw from `features` through the last layer with the pure parameters `params`."""


CAPABILITY_PROTOCOLS = {
  LOCAL_POSTERIOR: LocalPosterior,
  AGGREGATE_POSTERIOR: AggregatePosterior,
  POSTERIOR_DENSITY: PosteriorDensity,
  RECONSTRUCTION: Reconstructs,
}


def _lacking(cls, protocol):
  """The protocol's methods that `cls` does not define (the protocol's own stubs do not count),
  in the order the protocol declares them."""
  return [
    name
    for name, stub in vars(protocol).items()
    if not name.startswith("_") and getattr(cls, name, None) in (None, stub)
  ]


def check_model_class(name, cls):
  """A one-line ModelContractError unless `cls` gives every method of `VAE` and of each
  capability it declares in CAPABILITIES; the model registry calls it on registration."""
  what = f"model {name!r} ({cls.__module__}.{cls.__qualname__})"
  lacking = _lacking(cls, VAE)
  if lacking:
    raise ModelContractError(
      f"{what} lacks {', '.join(lacking)} of the model contract "
      "(flaxvae/models/contract.py VAE): implement them"
    )
  declared = capabilities(cls)
  unknown = [c for c in declared if c not in CAPABILITY_PROTOCOLS]
  if unknown:
    raise ModelContractError(
      f"{what} declares unknown capabilities {unknown}: the known ones "
      f"are {', '.join(CAPABILITY_PROTOCOLS)}"
    )
  for capability in declared:
    lacking = _lacking(cls, CAPABILITY_PROTOCOLS[capability])
    if lacking:
      raise ModelContractError(
        f"{what} declares the {capability} capability but lacks "
        f"{', '.join(lacking)}: implement them or drop the capability"
      )
  return cls


def capabilities(model):
  """The capabilities a model (or model class) declares in CAPABILITIES, as a tuple."""
  return tuple(getattr(model, "CAPABILITIES", ()))


def has(model, capability):
  return capability in capabilities(model)
