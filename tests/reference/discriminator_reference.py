"""Writes tests/fixtures/discriminator.npz: a PyTorch PatchGAN's logits on fixed weights and images,
so tests/models/test_discriminator.py checks flaxvae's discriminator against it without torch.

The PyTorch side is pix2pix's NLayerDiscriminator as taming builds it (kernel 4, padding 1,
LeakyReLU 0.2; a stride-2 conv with bias, num_layers - 1 stride-2 conv + norm blocks, one
stride-1 conv + norm block, a stride-1 conv to one channel; convs before a norm have no bias),
written here from that description, with the norm swapped for GroupNorm or nothing in the other
variants. Width 5 makes the last GroupNorm's groups hold two channels (40 channels, 20 groups).
Weights are drawn at a scale that keeps activations of order one, so the comparison is not of
numbers near zero. The BatchNorm variant runs once in train mode (batch statistics; running
statistics move once) and then in eval mode.

Run (needs torch; the reference venv has it):
  .venv-ref/bin/python tests/reference/discriminator_reference.py
"""

import pathlib

import numpy as np
import torch
from torch import nn

OUT = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "discriminator.npz"
WIDTH, NUM_LAYERS, CHANNELS, BATCH, SIDE = 5, 3, 3, 3, 32
NORMS = ("batch", "group", "none")


def group_count(channels, groups=32):
  return max(g for g in range(1, min(groups, channels) + 1) if channels % g == 0)


def make_norm(kind, channels):
  if kind == "batch":
    return nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)
  if kind == "group":
    return nn.GroupNorm(group_count(channels), channels, eps=1e-5)
  return None


class PatchGAN(nn.Module):
  def __init__(self, kind):
    super().__init__()
    widths = [WIDTH * min(2**k, 8) for k in range(NUM_LAYERS + 1)]
    self.convs = nn.ModuleList([nn.Conv2d(CHANNELS, WIDTH, 4, 2, 1)])
    self.norms = nn.ModuleList()
    for k in range(1, NUM_LAYERS + 1):
      stride = 2 if k < NUM_LAYERS else 1
      self.convs.append(nn.Conv2d(widths[k - 1], widths[k], 4, stride, 1, bias=kind == "none"))
      self.norms.append(make_norm(kind, widths[k]) or nn.Identity())
    self.convs.append(nn.Conv2d(widths[-1], 1, 4, 1, 1))

  def forward(self, x):
    x = nn.functional.leaky_relu(self.convs[0](x), 0.2)
    for conv, norm in zip(self.convs[1:-1], self.norms):
      x = nn.functional.leaky_relu(norm(conv(x)), 0.2)
    return self.convs[-1](x)


def main():
  rng = np.random.default_rng(0)
  normal = lambda shape, std: (std * rng.standard_normal(shape)).astype(np.float32)
  fixture = {
    "width": np.int64(WIDTH),
    "num_layers": np.int64(NUM_LAYERS),
    "images": rng.uniform(-1, 1, (BATCH, CHANNELS, SIDE, SIDE)).astype(np.float32),
  }
  models = {kind: PatchGAN(kind) for kind in NORMS}
  shapes = [tuple(conv.weight.shape) for conv in models["none"].convs]
  for i, shape in enumerate(shapes):
    fixture[f"conv{i}.weight"] = normal(shape, 1 / np.sqrt(np.prod(shape[1:])))
    for kind, model in models.items():
      if model.convs[i].bias is not None:
        fixture[f"conv{i}.bias.{kind}"] = normal(shape[:1], 0.1)
  for i in range(1, NUM_LAYERS + 1):
    fixture[f"norm{i}.weight"] = 1 + normal(shapes[i][:1], 0.1)
    fixture[f"norm{i}.bias"] = normal(shapes[i][:1], 0.1)
  images = torch.from_numpy(fixture["images"])
  for kind, model in models.items():
    with torch.no_grad():
      for i, conv in enumerate(model.convs):
        conv.weight.copy_(torch.from_numpy(fixture[f"conv{i}.weight"]))
        if conv.bias is not None:
          conv.bias.copy_(torch.from_numpy(fixture[f"conv{i}.bias.{kind}"]))
      for i, norm in enumerate(model.norms, 1):
        if not isinstance(norm, nn.Identity):
          norm.weight.copy_(torch.from_numpy(fixture[f"norm{i}.weight"]))
          norm.bias.copy_(torch.from_numpy(fixture[f"norm{i}.bias"]))
      model.train()
      fixture[f"logits.{kind}"] = model(images).numpy()
      if kind == "batch":
        for i, norm in enumerate(model.norms, 1):
          fixture[f"norm{i}.running_mean"] = norm.running_mean.numpy().copy()
          fixture[f"norm{i}.running_var"] = norm.running_var.numpy().copy()
        model.eval()
        fixture["logits.batch.eval"] = model(images).numpy()
  OUT.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(OUT, **fixture)
  print(f"wrote {OUT} ({OUT.stat().st_size} bytes, torch {torch.__version__})")


if __name__ == "__main__":
  main()
