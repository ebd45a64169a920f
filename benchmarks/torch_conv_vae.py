"""PyTorch twin of flaxvae's ConvVAE (models.py), to time the same architecture under oneDNN.

    .venv-torch/bin/python benchmarks/torch_conv_vae.py [--steps 60] [--batch 128]

Same layers, shapes and loss as `configs/fashion_mnist_conv.py`: stride-2 3x3 convs (32, 64)
each followed by a residual block x + conv1x1(relu(conv3x3(relu(x)))), a dense layer to
2 x 16 latents, one posterior sample, a dense layer back to 7x7x64, and per stage a residual
block then a 3x3 conv to 4x the channels and depth-to-space (pixel shuffle); Bernoulli
likelihood on grey levels, Adam 1e-3. Prints one JSON line (steady-state examples/s: median
of windows after warm-up). Data: random grey levels (the step's cost does not depend on them).
"""

import argparse
import itertools
import json
import os
import statistics
import sys

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flaxvae.runtime import timing


class Residual(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.conv, self.proj = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)

  def forward(self, x):
    return x + self.proj(F.relu(self.conv(F.relu(x))))


class ConvVAE(nn.Module):
  def __init__(self, channels=(32, 64), latent=16, side=28, colors=1):
    super().__init__()
    ins = [colors, *channels[:-1]]
    # flax "SAME" for a stride-2 3x3 conv on an even side pads (0, 1); torch pads symmetrically,
    # which costs the same FLOPs (the output shapes match).
    self.down = nn.ModuleList(
      nn.Conv2d(i, o, 3, stride=2, padding=1) for i, o in zip(ins, channels)
    )
    self.down_blocks = nn.ModuleList(Residual(c) for c in channels)
    self.bottom = (channels[-1], side // 2 ** len(channels), side // 2 ** len(channels))
    flat = channels[-1] * self.bottom[1] * self.bottom[2]
    self.to_posterior, self.from_latent = nn.Linear(flat, 2 * latent), nn.Linear(latent, flat)
    outs = [*reversed(channels[:-1]), colors]
    self.up_blocks = nn.ModuleList(Residual(c) for c in reversed(channels))
    self.up = nn.ModuleList(
      nn.Conv2d(i, 4 * o, 3, padding=1) for i, o in zip(reversed(channels), outs)
    )

  def forward(self, x):
    h = x
    for down, block in zip(self.down, self.down_blocks):
      h = block(F.relu(down(h)))
    mean, logvar = self.to_posterior(F.relu(h).flatten(1)).chunk(2, dim=1)
    z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)
    h = self.from_latent(z).view(-1, *self.bottom)
    for block, up in zip(self.up_blocks, self.up):
      h = F.pixel_shuffle(up(F.relu(block(h))), 2)
    return h, mean, logvar


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--steps", type=int, default=60, help="steps per timed window")
  parser.add_argument("--windows", type=int, default=5)
  parser.add_argument("--batch", type=int, default=128)
  args = parser.parse_args()
  torch.manual_seed(0)
  model = ConvVAE()
  opt = torch.optim.Adam(model.parameters(), lr=1e-3)
  data = torch.rand(args.batch * 8, 1, 28, 28)

  def step(i):
    x = data[(i % 8) * args.batch : (i % 8 + 1) * args.batch]
    opt.zero_grad(set_to_none=True)
    logits, mean, logvar = model(x)
    rec = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
    loss = (rec - 0.5 * torch.sum(1 + logvar - mean.pow(2) - logvar.exp())) / len(x)
    loss.backward()
    opt.step()
    return loss

  calls, last = itertools.count(), {}
  # warm-up: oneDNN primitive caches, allocator
  measured = timing.time_calls(
    lambda: last.update(loss=step(next(calls))),
    warmup=10,
    windows=args.windows,
    calls_per_window=args.steps,
  )
  rates, loss = measured.rates(args.batch), last["loss"]
  print(
    json.dumps(
      {
        "impl": "torch_conv",
        "examples_per_s": round(statistics.median(rates)),
        "window_examples_per_s": [round(r) for r in rates],
        "batch_size": args.batch,
        "params": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "loss": round(float(loss), 2),
      }
    )
  )


if __name__ == "__main__":
  main()
