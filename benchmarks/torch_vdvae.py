"""PyTorch twin of flaxvae's VDVAE (flaxvae/models/vdvae.py), to time the same architecture and
training step under oneDNN.

    .venv-torch/bin/python benchmarks/torch_vdvae.py --config vdvae [--steps 10 --windows 5]
    .venv-torch/bin/python benchmarks/torch_vdvae.py --config effvdvae [--steps 3 --windows 3]

`vdvae` is `configs/fashion_mnist_vdvae.py` (12 latent layers of 8 channels, widths 64..16,
bottleneck 0.5, ReLU, Adamax 2e-3, batch 64); `effvdvae` is `configs/fashion_mnist_effvdvae.py`
(23 latent layers of 32 channels, widths 512..32, no bottleneck, SiLU, Adamax 1e-3, batch 32).
Both: Bernoulli likelihood, 28x28 zero-padded to 32x32 (after x -> 2x - 1), output cropped back.

Same layers, initial scales, parameter count and loss as flaxvae: a bottom-up encoder (3x3 input
conv; per resolution a group of pre-activation bottleneck residual blocks 1x1, kxk, kxk, 1x1
with k = 3 above 2x2 and 1 at <= 2; average pooling between resolutions, plus a 1x1 conv when
the width changes) keeps its last activation per resolution; a top-down decoder (a learned start
per resolution; nearest upsampling plus a 1x1 conv when the width changes) runs per latent layer
a prior block (width -> 2 latent + width, last conv zero), a posterior block over [state, encoder
activation] -> 2 latent, softplus std with beta = ln 2, one sample z = mean + std * eps, the
analytic Gaussian KL, a 1x1 projection of z added to the state and a residual block; then
gain/bias and a 1x1 output conv. Loss: the negative ELBO per example (-log p(x|z) + sum of the
per-layer KLs), averaged over the batch. Kernels are lecun-normal (flax's default), biases zero;
the last conv of the residual blocks and the z projections are scaled by sqrt(1 / decoder
layers), of the encoder blocks by sqrt(1 / encoder blocks).

Not in this step (flaxvae's trainer does them; they are elementwise over the parameters, cheap
next to the convolutions): the EMA of the parameters, the gradient norm / adaptive skip, the
KL warm-up factor, effvdvae's decoupled weight decay, the IWAE metric.

Prints one JSON line (steady-state examples/s: median of windows after warm-up). Data: a fixed
set of 8 random binary batches (the step's cost does not depend on the pixel values).
"""

import argparse
import itertools
import json
import math
import os
import statistics
import sys

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flaxvae.runtime import timing

STD_BETA = math.log(2.0)  # softplus_beta(0) = 1
MIN_STD_INPUT = -20.0
ACTIVATIONS = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu}
ACTIVATION = F.silu  # set from the config in main()

CONFIGS = {
  "vdvae": dict(
    dec_layers="1:2,4:3,8:4,16:2,32:1",
    enc_blocks="32:1,16:1,8:2,4:2,1:1",
    widths="32:16,16:32,8:64,4:64,1:64",
    bottleneck=0.5,
    latent_channels=8,
    lr=2e-3,
    batch_size=64,
    channels_last=1,
    activation="relu",
  ),
  "effvdvae": dict(
    dec_layers="1:5,4:5,8:10,16:2,32:1",
    enc_blocks="32:1,16:2,8:10,4:5,1:5",
    widths="32:32,16:64,8:128,4:256,1:512",
    bottleneck=1.0,
    latent_channels=32,
    lr=1e-3,
    batch_size=32,
    channels_last=0,
    activation="silu",
  ),
}


def parse_counts(spec):
  return [tuple(int(v) for v in part.split(":")) for part in spec.split(",") if part]


def conv(cin, cout, kernel, scale=1.0):
  """flax nnx.Conv's twin: SAME padding, lecun-normal kernel (truncated), zero bias."""
  c = nn.Conv2d(cin, cout, kernel, padding=kernel // 2)
  std = math.sqrt(1.0 / (cin * kernel * kernel)) / 0.87962566103423978
  with torch.no_grad():
    nn.init.trunc_normal_(c.weight, std=std, a=-2 * std, b=2 * std)
    c.weight.mul_(scale)
    c.bias.zero_()
  return c


class Block(nn.Module):
  """Pre-activation bottleneck block: 1x1, kxk, kxk, 1x1; residual if asked."""

  def __init__(self, cin, mid, cout, kernel, residual, last_scale=1.0):
    super().__init__()
    self.residual, self.act = residual, ACTIVATION
    self.c1, self.c2, self.c3 = conv(cin, mid, 1), conv(mid, mid, kernel), conv(mid, mid, kernel)
    self.c4 = conv(mid, cout, 1, last_scale)

  def forward(self, x):
    act = self.act
    h = self.c4(act(self.c3(act(self.c2(act(self.c1(act(x))))))))
    return x + h if self.residual else h


class DecoderLayer(nn.Module):
  def __init__(self, width, mid, latent, kernel, out_scale):
    super().__init__()
    self.posterior = Block(2 * width, mid, 2 * latent, kernel, residual=False)
    self.prior = Block(width, mid, 2 * latent + width, kernel, residual=False, last_scale=0.0)
    self.z_proj = conv(latent, width, 1, out_scale)
    self.resnet = Block(width, mid, width, kernel, residual=True, last_scale=out_scale)


def std_of(raw):
  std = F.softplus(STD_BETA * torch.clamp(raw, min=MIN_STD_INPUT)) / STD_BETA
  return std, torch.log(std)


def gaussian_kl(q_mean, q_log_std, p_mean, p_log_std):
  ratio = torch.exp(2 * (q_log_std - p_log_std))
  return (
    0.5 * (ratio + ((q_mean - p_mean) * torch.exp(-p_log_std)) ** 2 - 1.0) + p_log_std - q_log_std
  )


class VDVAE(nn.Module):
  def __init__(
    self,
    dec_layers,
    enc_blocks,
    widths,
    bottleneck,
    latent_channels,
    side=28,
    pad_to=32,
    colors=1,
    **_,
  ):
    super().__init__()
    self.side, self.pad, self.latent = pad_to, (pad_to - side) // 2, latent_channels
    self.dec_spec, self.enc_spec = parse_counts(dec_layers), parse_counts(enc_blocks)
    w = dict(parse_counts(widths))
    num_dec = sum(n for _, n in self.dec_spec)
    num_enc = sum(n for _, n in self.enc_spec)
    mid = lambda r: max(1, int(w[r] * bottleneck))
    kernel = lambda r: 3 if r > 2 else 1
    self.enc_in = conv(colors, w[pad_to], 3)
    self.enc_groups = nn.ModuleList(
      nn.ModuleList(
        Block(w[r], mid(r), w[r], kernel(r), True, math.sqrt(1 / num_enc)) for _ in range(n)
      )
      for r, n in self.enc_spec
    )
    self.enc_proj = nn.ModuleList(
      conv(w[r], w[nxt], 1) if w[r] != w[nxt] else nn.Identity()
      for (r, _), (nxt, _) in zip(self.enc_spec[:-1], self.enc_spec[1:])
    )
    self.dec_bias = nn.ParameterList(
      nn.Parameter(torch.zeros(1, w[r], r, r)) for r, _ in self.dec_spec
    )
    self.dec_proj = nn.ModuleList(
      conv(w[prev], w[r], 1) if w[prev] != w[r] else nn.Identity()
      for (prev, _), (r, _) in zip(self.dec_spec[:-1], self.dec_spec[1:])
    )
    self.dec_groups = nn.ModuleList(
      nn.ModuleList(
        DecoderLayer(w[r], mid(r), latent_channels, kernel(r), math.sqrt(1 / num_dec))
        for _ in range(n)
      )
      for r, n in self.dec_spec
    )
    self.out_gain = nn.Parameter(torch.ones(1, w[pad_to], 1, 1))
    self.out_bias = nn.Parameter(torch.zeros(1, w[pad_to], 1, 1))
    self.to_output = conv(w[pad_to], colors, 1)  # bernoulli: one logit per channel

  def encode(self, x):
    p = self.pad
    h = self.enc_in(F.pad(2.0 * x - 1.0, (p, p, p, p)))
    acts = {}
    for i, ((r, _), group) in enumerate(zip(self.enc_spec, self.enc_groups)):
      for block in group:
        h = block(h)
      acts[r] = h
      if i + 1 < len(self.enc_spec):
        h = self.enc_proj[i](F.avg_pool2d(h, r // self.enc_spec[i + 1][0]))
    return acts

  def forward(self, x, eps=None):
    """(logits [b, C, 28, 28], total KL per example [b]); eps: per-layer noise (tests only)."""
    acts, b, c = self.encode(x), x.shape[0], self.latent
    h, kl_total, l = None, 0.0, 0
    for g, ((r, _), group) in enumerate(zip(self.dec_spec, self.dec_groups)):
      start = self.dec_bias[g]
      if h is None:
        h = start.expand(b, -1, -1, -1)
      else:
        up = F.interpolate(h, scale_factor=r // self.dec_spec[g - 1][0], mode="nearest")
        h = start + self.dec_proj[g - 1](up)
      act = acts[r]
      for layer in group:
        prior = layer.prior(h)
        p_mean, (_, p_log_std) = prior[:, :c], std_of(prior[:, c : 2 * c])
        q = layer.posterior(torch.cat([h, act], dim=1))
        q_mean, (q_std, q_log_std) = q[:, :c], std_of(q[:, c:])
        z = q_mean + q_std * (torch.randn_like(q_mean) if eps is None else eps[l])
        l += 1
        kl_total = kl_total + gaussian_kl(q_mean, q_log_std, p_mean, p_log_std).sum((1, 2, 3))
        h = h + prior[:, 2 * c :]
        h = layer.resnet(h + layer.z_proj(z))
    logits = self.to_output(h * self.out_gain + self.out_bias)
    p = self.pad
    return logits[:, :, p : self.side - p, p : self.side - p], kl_total


def neg_elbo(model, x):
  logits, kl = model(x)
  log_px_z = (x * logits - F.softplus(logits)).sum((1, 2, 3))
  return (kl - log_px_z).mean()


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--config", choices=sorted(CONFIGS), default="vdvae")
  parser.add_argument(
    "--batch_size",
    type=int,
    default=None,
    help="default: 64 for vdvae, 32 for effvdvae (the configs')",
  )
  parser.add_argument("--steps", type=int, default=10, help="steps per timed window")
  parser.add_argument("--windows", type=int, default=5)
  parser.add_argument(
    "--activation",
    choices=sorted(ACTIVATIONS),
    default=None,
    help="override the config's activation (as --config.model.activation)",
  )
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
  parser.add_argument(
    "--channels_last",
    type=int,
    choices=(0, 1),
    default=None,
    help="NHWC memory format for the model and data; default: the faster one on CPU "
    "(1 for vdvae, 0 for effvdvae)",
  )
  parser.add_argument(
    "--compile",
    action="store_true",
    help="torch.compile the loss function (not faster on CPU, so off by default)",
  )
  parser.add_argument(
    "--print_losses",
    action="store_true",
    help="also record every step's loss (a check that it falls)",
  )
  args = parser.parse_args()
  cfg = dict(CONFIGS[args.config])
  if args.activation:
    cfg["activation"] = args.activation
  global ACTIVATION
  ACTIVATION = ACTIVATIONS[cfg["activation"]]
  batch = args.batch_size or cfg["batch_size"]
  if args.channels_last is None:
    args.channels_last = cfg["channels_last"]
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  model = VDVAE(**cfg)
  fmt = torch.channels_last if args.channels_last else torch.contiguous_format
  model = model.to(memory_format=fmt)
  opt = torch.optim.Adamax(model.parameters(), lr=cfg["lr"])
  probs = torch.rand(1, 1, 28, 28)  # a fixed per-pixel probability map, binarized per example
  data = (torch.rand(batch * 8, 1, 28, 28) < probs).float().contiguous(memory_format=fmt)
  loss_fn = torch.compile(neg_elbo) if args.compile else neg_elbo
  losses = []

  def step(i):
    x = data[(i % 8) * batch : (i % 8 + 1) * batch]
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model, x)
    loss.backward()
    opt.step()
    if args.print_losses:
      losses.append(round(loss.item(), 2))
    return loss

  calls, last = itertools.count(), {}

  def call():
    last["loss"] = step(next(calls))
    return last["loss"]

  # warm-up: oneDNN primitive caches, allocator (and compilation)
  measured = timing.time_calls(
    call,
    wait=lambda loss: loss.item(),
    warmup=args.warmup,
    windows=args.windows,
    calls_per_window=args.steps,
  )
  rates, warmup_s, loss = measured.rates(batch), measured.warmup_s, last["loss"]
  out = {
    "impl": "torch_vdvae",
    "config": args.config,
    "batch_size": batch,
    "examples_per_s": round(statistics.median(rates), 2),
    "window_examples_per_s": [round(r, 2) for r in rates],
    "params": sum(p.numel() for p in model.parameters()),
    "torch": torch.__version__,
    "threads": torch.get_num_threads(),
    "channels_last": bool(args.channels_last),
    "compile": args.compile,
    "warmup_s": round(warmup_s, 1),
    "loss": round(loss.item(), 2),
  }
  if args.print_losses:
    out["losses"] = losses
  print(json.dumps(out))


if __name__ == "__main__":
  main()
