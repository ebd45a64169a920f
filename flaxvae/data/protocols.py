"""Data protocols: what the model is trained and scored on, so figures compare with papers.

  grey              grey levels k/255 in [0, 1] as they are (the PyTorch example's habit)
  8bit              the same values, declared as 8-bit data: a discretized likelihood
                    (discretized_logistic, mixture_logistic) is then a probability mass over
                    the 256 levels, and NLL is reported in bits/dim
  binarized         dynamic binarization: every training step draws x ~ Bernoulli(k/255); the
                    evaluation split is binarized once with a fixed seed, the same for every
                    run (Burda et al. 2016)
  static_binarized  threshold at 0.5, train and test (Cremer et al. 2018's Fashion-MNIST)

A likelihood is a probability model of the evaluated data only on the data it is a mass for:
Bernoulli on the binarized protocols, the discretized families on 8bit. Gaussian likelihoods
are densities, never masses. `is_probability_model` says which; evaluation reports log p(x),
NLL and bits/dim only where it holds and labels the figures otherwise.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from flaxvae.registry import Registry

TEST_BINARIZATION_SEED = 0  # the binarized protocol's fixed evaluation draw, whatever the run seed


class Protocol(NamedTuple):
  name: str
  data_kind: str  # "binary" or "8bit": the values the model is scored on
  dynamic: bool  # training targets are fresh Bernoulli draws each step
  threshold: bool  # targets are the images thresholded at 0.5


PROTOCOLS = Registry("data.protocol")
for _protocol in (
  Protocol("grey", "8bit", False, False),
  Protocol("8bit", "8bit", False, False),
  Protocol("binarized", "binary", True, False),
  Protocol("static_binarized", "binary", False, True),
):
  PROTOCOLS.register(_protocol.name)(_protocol)


def is_probability_model(protocol: Protocol, likelihood) -> bool:
  """Whether log p(x|z) is a probability mass of the data the protocol scores."""
  return likelihood.data_kind == protocol.data_kind and protocol.name != "grey"


def to_unit_range(images_uint8):
  return images_uint8.astype(jnp.float32) / 255.0


def train_targets(images_uint8, uniform, protocol: Protocol):
  """uint8 images -> training targets; `uniform` [b, H, W, C] draws for dynamic binarization."""
  x = to_unit_range(images_uint8)
  if protocol.dynamic:
    return (uniform < x).astype(jnp.float32)
  if protocol.threshold:
    return (x > 0.5).astype(jnp.float32)
  return x


def eval_targets(images_uint8, example_ids, protocol: Protocol):
  """uint8 images -> the targets evaluation scores: the binarized protocol's draw is keyed by
  example id from a fixed seed, so every run and every subset sees the same binary images."""
  if not protocol.dynamic:
    return train_targets(images_uint8, None, protocol)
  key = jax.random.key(TEST_BINARIZATION_SEED)
  uniform = jax.vmap(
    lambda i: jax.random.uniform(jax.random.fold_in(key, i), images_uint8.shape[1:])
  )(example_ids)
  return train_targets(images_uint8, uniform, protocol)
