"""The peers `flaxvae train` is compared with on the MLP VAE: the classic 784-400-20 model, Adam
at 1e-3, batch 128, a Bernoulli on grey levels of Fashion-MNIST, written as a user who did not
have flaxvae would write it.

    .venv/bin/python benchmarks/peer_mlp_vae.py flax_scan [--epochs 3] [--data DIR]
    .venv-torch/bin/python benchmarks/peer_mlp_vae.py torch

IMPL:
  torch       the PyTorch example's model and loss, a DataLoader over shuffled batches
  flax_nojit  the Flax example's Linen model, its train step called without jit
  flax_jit    the same step under jax.jit, called once per batch from Python
  flax_scan   a whole epoch as one jitted lax.scan over the device-resident split: the
              machine's practical limit for this model

Prints one JSON line: impl, examples_per_s (the epochs after the first, which compiles),
first_epoch_s, test_neg_elbo (nats per test image, one posterior sample) and epochs. The
timing loop is flaxvae's own (flaxvae/runtime/timing.py, standard library only), so this
script imports neither JAX nor flaxvae's dependencies when it runs the torch peer.
"""

import argparse
import gzip
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from flaxvae.runtime import timing

BATCH, HIDDEN, LATENT, PIXELS, LEARNING_RATE = 128, 400, 20, 784, 1e-3
IMPLS = ("torch", "flax_nojit", "flax_jit", "flax_scan")


def read_images(folder, split):
  """[n, 784] float32 grey levels in [0, 1] from Fashion-MNIST's IDX file (gzipped or not)."""
  stem = os.path.join(folder, f"{'train' if split == 'train' else 't10k'}-images-idx3-ubyte")
  path = stem + ".gz" if os.path.exists(stem + ".gz") else stem
  with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
    pixels = np.frombuffer(f.read(), np.uint8, offset=16)
  return pixels.reshape(-1, PIXELS).astype(np.float32) / 255.0


def torch_peer(train, test):
  """(per-epoch callable, test loss callable) of the PyTorch example."""
  import torch
  from torch import nn
  from torch.nn import functional

  torch.manual_seed(0)

  class MlpVae(nn.Module):
    def __init__(self):
      super().__init__()
      self.encoder = nn.Linear(PIXELS, HIDDEN)
      self.mean, self.log_var = nn.Linear(HIDDEN, LATENT), nn.Linear(HIDDEN, LATENT)
      self.decoder_hidden, self.decoder_out = nn.Linear(LATENT, HIDDEN), nn.Linear(HIDDEN, PIXELS)

    def forward(self, x):
      h = functional.relu(self.encoder(x))
      mean, log_var = self.mean(h), self.log_var(h)
      z = mean + torch.exp(0.5 * log_var) * torch.randn_like(mean)
      return self.decoder_out(functional.relu(self.decoder_hidden(z))), mean, log_var

  def neg_elbo(model, x):  # summed over the batch, as the example does
    logits, mean, log_var = model(x)
    distortion = functional.binary_cross_entropy_with_logits(logits, x, reduction="sum")
    return distortion - 0.5 * torch.sum(1 + log_var - mean.pow(2) - log_var.exp())

  model = MlpVae()
  optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
  batches = torch.utils.data.DataLoader(
    torch.utils.data.TensorDataset(torch.from_numpy(train)),
    batch_size=BATCH,
    shuffle=True,
    drop_last=True,
  )

  def epoch():
    for (x,) in batches:
      optimizer.zero_grad()
      neg_elbo(model, x).backward()
      optimizer.step()

  def test_loss():
    with torch.no_grad():
      return float(neg_elbo(model, torch.from_numpy(test))) / len(test)

  return epoch, lambda _: None, test_loss


def flax_peer(impl, train, test):
  """(per-epoch callable, what to wait on, test loss callable) of a Flax Linen peer."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import linen

  class MlpVae(linen.Module):
    @linen.compact
    def __call__(self, x, key):
      h = linen.relu(linen.Dense(HIDDEN)(x))
      mean, log_var = linen.Dense(LATENT)(h), linen.Dense(LATENT)(h)
      z = mean + jnp.exp(0.5 * log_var) * jax.random.normal(key, mean.shape)
      return linen.Dense(PIXELS)(linen.relu(linen.Dense(HIDDEN)(z))), mean, log_var

  def neg_elbo(params, x, key):  # per example
    logits, mean, log_var = MlpVae().apply({"params": params}, x, key)
    distortion = optax.sigmoid_binary_cross_entropy(logits, x).sum()
    kl = -0.5 * jnp.sum(1 + log_var - mean**2 - jnp.exp(log_var))
    return (distortion + kl) / x.shape[0]

  optimizer = optax.adam(LEARNING_RATE)

  def step(carry, x_and_key):
    params, opt_state = carry
    loss, grads = jax.value_and_grad(neg_elbo)(params, *x_and_key)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  key = jax.random.key(0)
  params = MlpVae().init(key, jnp.zeros((BATCH, PIXELS)), key)["params"]
  state = {"carry": (params, optimizer.init(params)), "key": key}
  steps = len(train) // BATCH
  order = np.random.default_rng(0)

  if impl == "flax_scan":
    split = jax.device_put(train)

    @jax.jit
    def whole_epoch(carry, key):
      key_order, key_steps = jax.random.split(key)
      batches = jax.random.permutation(key_order, len(train))[: steps * BATCH]
      batches = batches.reshape(steps, BATCH)
      carry, _ = jax.lax.scan(
        lambda c, a: step(c, (split[a[0]], a[1])),
        carry,
        (batches, jax.random.split(key_steps, steps)),
      )
      return carry

    def epoch():
      state["key"], key = jax.random.split(state["key"])
      state["carry"] = whole_epoch(state["carry"], key)
  else:
    one_step = jax.jit(step) if impl == "flax_jit" else step

    def epoch():
      shuffled = order.permutation(len(train))
      for i in range(steps):
        state["key"], key = jax.random.split(state["key"])
        batch = train[shuffled[i * BATCH : (i + 1) * BATCH]]
        state["carry"], _ = one_step(state["carry"], (batch, key))

  def test_loss():
    return float(neg_elbo(state["carry"][0], jnp.asarray(test), state["key"]))

  return epoch, lambda _: jax.block_until_ready(state["carry"]), test_loss


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("impl", choices=IMPLS)
  parser.add_argument(
    "--data",
    default=os.environ.get("FMNIST_DIR", "/usr/share/datasets/fashion-mnist"),
    help="folder of Fashion-MNIST's IDX files",
  )
  parser.add_argument("--epochs", type=int, default=3, help="the first one compiles")
  args = parser.parse_args()
  train, test = read_images(args.data, "train"), read_images(args.data, "test")
  if args.impl == "torch":
    epoch, wait, test_loss = torch_peer(train, test)
  else:
    epoch, wait, test_loss = flax_peer(args.impl, train, test)
  measured = timing.time_calls(epoch, wait=wait, windows=max(args.epochs - 1, 0))
  steady = measured.window_s or (measured.warmup_s,)
  examples = (len(train) // BATCH) * BATCH * len(steady)
  print(
    json.dumps(
      {
        "impl": args.impl,
        "examples_per_s": round(examples / sum(steady)),
        "first_epoch_s": round(measured.warmup_s, 2),
        "test_neg_elbo": round(test_loss(), 2),
        "epochs": args.epochs,
      }
    )
  )


if __name__ == "__main__":
  main()
