"""PyTorch twin of flaxvae's latent KL autoencoder config (configs/fashion_mnist_kl_f4.py), to time
the same two-player training step under oneDNN (issue 34, item 8).

    .venv-ref/bin/python benchmarks/torch_kl_autoencoder.py --phase before
    .venv-ref/bin/python benchmarks/torch_kl_autoencoder.py --phase after [--adaptive_weight ldm]

The autoencoder is diffusers' AutoencoderKL with the config's layout: block_out_channels
(32, 64, 64) (4x downsampling), one ResNet block per level (two in the decoder), the middle
block's single-head attention only, 4 latent channels, quant / post-quant 1x1 convolutions,
GroupNorm(32, eps 1e-6), grey images in and out; 28x28 images in [-1, 1] are zero-padded to 32x32
before the encoder and the decoder's output is cropped back, as flaxvae's `pad_to` does.

The loss and the two optimizer steps per batch follow LDM's contperceptual.py
(LPIPSWithDiscriminator): nll = |x - x'| + LPIPS(x, x') (VGG16, grey repeated to 3 channels by
the caller, one value per image broadcast over its pixels) with LDM's log-variance fixed at 0,
summed over pixels and averaged over the batch; plus 1e-6 times the posterior's KL (summed over
latent elements, averaged over the batch). After the discriminator's start (`--phase after`) the
generator's loss adds the adaptive weight (||d nll / dW|| / (||d g / dW|| + 1e-4) at the
decoder's last convolution W, clamped to [0, 1e4], detached, times 0.5) times the hinge
generator loss -mean(D(x')); then the discriminator (pix2pix's PatchGAN, 2 strided layers, width
32, BatchNorm) takes a step on the hinge loss of D(x) and D(x'). Both optimizers are Adam at LDM's
rate 4.5e-6 x batch with betas (0.5, 0.9). Before the start (`--phase before`) nothing the
discriminator does reaches either player, so that step is the autoencoder's alone.

`--adaptive_weight ldm` computes the adaptive weight as LDM does, with two torch.autograd.grad
calls back to the last convolution's kernel, each going back through LPIPS or the discriminator
before the step's own backward pass goes through them again. `at_output` gives the same
gradients with each network differentiated once: the gradients of nll and of the generator
loss with respect to the decoder's output, the kernel gradients from those through the last
convolution only, then one backward pass of their weighted sum (the weight is a constant):
the path flaxvae's step takes (flaxvae/train/players.py).
Differences from LDM that do not change the step's work: the discriminator's step reuses the
generator step's reconstruction instead of running the autoencoder again (LDM's Lightning loop
calls training_step once per optimizer), and before the start LDM still runs the discriminator
and its zero-weighted step.

LPIPS is the `lpips` package's (its linear heads ship with it); its VGG16 backbone would come
from torchvision's download, so it is built with random weights (`pnet_rand`) and loaded, heads
too, from flaxvae's converted file ($FLAXVAE_WEIGHTS_DIR/lpips_vgg16.npz, `flaxvae weights
prepare lpips_vgg16`) when there is one: the step's cost does not depend on the values. Data:
random grey levels (neither does it depend on them). Activations are channels-last, which
oneDNN runs faster here (`--channels_last 0` for NCHW).

Prints one JSON line: steady-state examples/s (median of windows after warm-up), the FLOPs of
one step counted by torch.utils.flop_counter.FlopCounterMode (convolutions, matmuls and
attention; not elementwise ops), the float32 matmul peak measured with torch here and the MFU
against it.
"""

import argparse
import itertools
import json
import os
import statistics
import sys

import lpips
import numpy as np
import torch
from diffusers import AutoencoderKL
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine

from flaxvae.runtime import timing

SIDE, PAD_TO = 28, 32
BATCH = 32
KL_WEIGHT, PERCEPTUAL_WEIGHT, DISC_WEIGHT = 1e-6, 1.0, 0.5
MAX_ADAPTIVE_WEIGHT, ADAPTIVE_EPS = 1e4, 1e-4
BASE_LEARNING_RATE, BETAS = 4.5e-6, (0.5, 0.9)


def autoencoder():
  """diffusers' AutoencoderKL in the config's layout (grey in and out)."""
  return AutoencoderKL(
    in_channels=1,
    out_channels=1,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=PAD_TO,
  )


class PatchGAN(nn.Sequential):
  """pix2pix's NLayerDiscriminator: a strided 4x4 conv with LeakyReLU(0.2), `num_layers - 1`
  more strided convs and one of stride 1, each BatchNorm (no conv bias) and LeakyReLU, then a
  stride-1 conv to one logit per patch; weights N(0, 0.02), BatchNorm scales N(1, 0.02)."""

  def __init__(self, channels=1, width=32, num_layers=2):
    widths = [width * min(2**n, 8) for n in range(num_layers + 1)]
    layers = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
    for n in range(1, num_layers + 1):
      stride = 2 if n < num_layers else 1
      layers += [
        nn.Conv2d(widths[n - 1], widths[n], 4, stride, 1, bias=False),
        nn.BatchNorm2d(widths[n]),
        nn.LeakyReLU(0.2),
      ]
    layers.append(nn.Conv2d(widths[-1], 1, 4, 1, 1))
    super().__init__(*layers)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
      elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


# flaxvae's LPIPS weights file (flaxvae/objectives/perceptual.py): VGG16's convolutions by name,
# kernels HWIO; torchvision's vgg16().features index of each, in order.
VGG16_CONVS = [
  f"conv{b}_{i}" for b, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3)) for i in range(1, n + 1)
]
TORCHVISION_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
LPIPS_HEADS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")


def flaxvae_weights_file():
  """flaxvae's converted LPIPS weights (`flaxvae weights prepare lpips_vgg16`), if present."""
  folder = os.environ.get("FLAXVAE_WEIGHTS_DIR") or "~/.cache/flaxvae/weights"
  path = os.path.join(os.path.expanduser(folder), "lpips_vgg16.npz")
  return path if os.path.exists(path) else ""


def perceptual_model(weights_path):
  """LPIPS(VGG16) with the package's shipped linear heads and a random backbone, both replaced
  by flaxvae's weights file when one is given. Returns (model, where its weights came from)."""
  model = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval().requires_grad_(False)
  if not weights_path:
    return model, "random backbone"
  arrays = np.load(weights_path)
  # lpips splits torchvision's `features` into slice1..slice5, keeping each layer's index.
  convs = {int(name.split(".")[-1]): m for name, m in model.net.named_modules() if "." in name}
  with torch.no_grad():
    for name, index in zip(VGG16_CONVS, TORCHVISION_CONV_INDICES):
      convs[index].weight.copy_(
        torch.from_numpy(arrays[f"vgg16/{name}/kernel"].transpose(3, 2, 0, 1))
      )
      convs[index].bias.copy_(torch.from_numpy(arrays[f"vgg16/{name}/bias"]))
    for head, feature in zip(model.lins, LPIPS_HEADS):
      head.model[-1].weight.copy_(torch.from_numpy(arrays[f"heads/{feature}"]).view(1, -1, 1, 1))
  return model, weights_path


class Step:
  """One training step of both players on a batch of images in [-1, 1], [b, 1, 28, 28]."""

  def __init__(self, phase, adaptive_weight, lpips_weights, batch):
    self.phase, self.adaptive_weight = phase, adaptive_weight
    self.vae, self.discriminator = autoencoder(), PatchGAN()
    self.perceptual, self.lpips_weights = perceptual_model(lpips_weights)
    self.last_layer = self.vae.decoder.conv_out.weight
    rate = BASE_LEARNING_RATE * batch  # LDM's main.py scales the base rate by the batch
    self.vae_opt = torch.optim.Adam(self.vae.parameters(), lr=rate, betas=BETAS)
    self.disc_opt = torch.optim.Adam(self.discriminator.parameters(), lr=rate, betas=BETAS)
    self.logvar = torch.zeros(())  # LDM's, not in the autoencoder optimizer's list

  def reconstruct(self, x11):
    pad = (PAD_TO - SIDE) // 2
    posterior = self.vae.encode(F.pad(x11, (pad,) * 4)).latent_dist
    out = self.vae.decode(posterior.sample()).sample
    return out[..., pad : pad + SIDE, pad : pad + SIDE], posterior

  def nll(self, x11, recon):
    distance = self.perceptual(x11.repeat(1, 3, 1, 1), recon.repeat(1, 3, 1, 1))
    rec = torch.abs(x11 - recon) + PERCEPTUAL_WEIGHT * distance
    return torch.sum(rec / torch.exp(self.logvar) + self.logvar) / len(x11)

  def __call__(self, x11):
    self.vae_opt.zero_grad(set_to_none=True)
    recon, posterior = self.reconstruct(x11)
    nll = self.nll(x11, recon)
    kl = torch.sum(posterior.kl()) / len(x11)
    if self.phase == "before":
      loss = nll + KL_WEIGHT * kl
      loss.backward()
      self.vae_opt.step()
      return loss.detach(), torch.zeros(())
    # Generator step: the discriminator's parameters take no gradient (Lightning's toggle).
    self.discriminator.requires_grad_(False)
    g_loss = -torch.mean(self.discriminator(recon))
    if self.adaptive_weight == "ldm":
      nll_grad = torch.autograd.grad(nll, self.last_layer, retain_graph=True)[0]
      g_grad = torch.autograd.grad(g_loss, self.last_layer, retain_graph=True)[0]
      weight = self.weight(nll_grad, g_grad)
      loss = nll + KL_WEIGHT * kl + weight * g_loss
      loss.backward()
    else:
      nll_out = torch.autograd.grad(nll, recon, retain_graph=True)[0]
      g_out = torch.autograd.grad(g_loss, recon, retain_graph=True)[0]
      nll_grad = torch.autograd.grad(recon, self.last_layer, nll_out, retain_graph=True)[0]
      g_grad = torch.autograd.grad(recon, self.last_layer, g_out, retain_graph=True)[0]
      weight = self.weight(nll_grad, g_grad)
      loss = nll.detach() + KL_WEIGHT * kl.detach() + weight * g_loss.detach()
      torch.autograd.backward([recon, KL_WEIGHT * kl], [nll_out + weight * g_out, None])
    self.vae_opt.step()
    # Discriminator step on the hinge loss (disc_factor 1 after the start).
    self.discriminator.requires_grad_(True)
    self.disc_opt.zero_grad(set_to_none=True)
    logits_real = self.discriminator(x11)
    logits_fake = self.discriminator(recon.detach())
    d_loss = 0.5 * (torch.mean(F.relu(1.0 - logits_real)) + torch.mean(F.relu(1.0 + logits_fake)))
    d_loss.backward()
    self.disc_opt.step()
    return loss.detach(), d_loss.detach()

  @staticmethod
  def weight(nll_grad, g_grad):
    ratio = torch.norm(nll_grad) / (torch.norm(g_grad) + ADAPTIVE_EPS)
    return torch.clamp(ratio, 0.0, MAX_ADAPTIVE_WEIGHT).detach() * DISC_WEIGHT


def step_flops(step, x11):
  """FLOPs of one call of `step` (it trains: run it where a warm-up step would run)."""
  counter = FlopCounterMode(display=False)
  with counter:
    step(x11)
  return counter.get_total_flops()


def matmul_peak(size=1024, seconds=1.0):
  """float32 matmul FLOP/s with torch here: the practical compute limit, as flaxvae measures
  its own (flaxvae.bench.matmul_peak)."""
  a = torch.ones(size, size)
  measured = timing.time_calls(lambda: a @ a, wait=lambda r: r.sum().item(), seconds=seconds)
  return measured.best_rate(2 * size**3)


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--phase", choices=("before", "after"), default="after")
  parser.add_argument("--adaptive_weight", choices=("ldm", "at_output"), default="ldm")
  parser.add_argument("--steps", type=int, default=3, help="steps per timed window")
  parser.add_argument("--windows", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--batch", type=int, default=BATCH)
  # oneDNN ran this step faster with channels-last activations here (timed alternating).
  parser.add_argument("--channels_last", type=int, default=1)
  parser.add_argument(
    "--lpips_weights",
    default=flaxvae_weights_file(),
    help="flaxvae's lpips_vgg16.npz (default: the weights directory's; random VGG16 without it)",
  )
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  step = Step(args.phase, args.adaptive_weight, args.lpips_weights, args.batch)
  fmt = torch.channels_last if args.channels_last else torch.contiguous_format
  for module in (step.vae, step.discriminator, step.perceptual):
    module.to(memory_format=fmt)
  data = (2 * torch.rand(args.batch * 8, 1, SIDE, SIDE) - 1).contiguous(memory_format=fmt)
  batches = (data[(i % 8) * args.batch : (i % 8 + 1) * args.batch] for i in itertools.count())
  flops = step_flops(step, next(batches))
  losses = []  # (generator loss, discriminator loss) of each step
  measured = timing.time_calls(  # the warm-up fills oneDNN's primitive caches, the allocator
    lambda: losses.append(step(next(batches))) or losses[-1][0],
    wait=lambda loss: loss.item(),
    warmup=args.warmup,
    windows=args.windows,
    calls_per_window=args.steps,
  )
  rates = measured.rates(args.batch)
  examples_per_s = statistics.median(rates)
  peak = matmul_peak()
  flops_per_example = flops / args.batch
  print(
    json.dumps(
      {
        "impl": "torch_klae",
        "phase": args.phase,
        "adaptive_weight": args.adaptive_weight,
        "batch_size": args.batch,
        "examples_per_s": round(examples_per_s, 2),
        "window_examples_per_s": [round(r, 2) for r in rates],
        "flops_per_example": round(flops_per_example),
        "matmul_peak_flop_per_s": round(peak),
        "mfu": round(flops_per_example * examples_per_s / peak, 4),
        "params": sum(p.numel() for p in step.vae.parameters()),
        "discriminator_params": sum(p.numel() for p in step.discriminator.parameters()),
        "lpips_weights": step.lpips_weights,
        "channels_last": bool(args.channels_last),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "warmup_s": round(measured.warmup_s, 1),
        "loss": round(float(losses[-1][0]), 3),
        "d_loss": round(float(losses[-1][1]), 4),
        "cpu": machine.cpu_model(),
      }
    )
  )


if __name__ == "__main__":
  main()
