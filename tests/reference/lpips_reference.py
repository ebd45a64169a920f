"""Writes tests/fixtures/lpips/{random,pretrained}.npz: LPIPS distances and input gradients by the
`lpips` package (0.1.4, PyTorch), the reference that tests/objectives/test_perceptual.py checks
flaxvae's LPIPS against, so `make test` needs no torch.

Run in a venv with torch, torchvision and lpips (not flaxvae's), after `make weights`:
  .venv-ref/bin/python tests/reference/lpips_reference.py [--weights ~/.cache/flaxvae/weights/...]

The model is lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True): lpips' own linear heads
(its vgg.pth) on a VGG16 trunk that this script loads from flaxvae's converted file, since
torchvision's ImageNet weights are a download. Two fixtures:
  random.npz: every weight (trunk and heads) drawn by lpips_random_weights.py from a fixed seed,
    which the test draws again; RGB, odd-sized and grey (32x32 and 28x28) pairs, distances in
    float32 and float64, and the grey pairs' d(sum of distances)/dx.
  pretrained.npz: the converted weights, with the heads checked bitwise against lpips' vgg.pth;
    synthetic 64x64 RGB and 32x32 grey pairs (noise, blur, shift, another image), distances and
    the grey pairs' gradients. Its test is skipped where the weights are absent.
Images are stored as uint8 and both sides map them to [-1, 1] as u / 127.5 - 1. Grey images are
repeated to RGB before lpips sees them, as flaxvae does.
"""

import argparse
import os
import pathlib
import sys
from importlib import metadata

import lpips
import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import lpips_random_weights

OUT = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "lpips"
DEFAULT_WEIGHTS = os.path.join(
  os.environ.get("FLAXVAE_WEIGHTS_DIR") or os.path.expanduser("~/.cache/flaxvae/weights"),
  "lpips_vgg16.npz",
)
# flaxvae's convolution names -> lpips' VGG16 slice and torchvision feature index.
CONVS = {
  "conv1_1": (1, 0),
  "conv1_2": (1, 2),
  "conv2_1": (2, 5),
  "conv2_2": (2, 7),
  "conv3_1": (3, 10),
  "conv3_2": (3, 12),
  "conv3_3": (3, 14),
  "conv4_1": (4, 17),
  "conv4_2": (4, 19),
  "conv4_3": (4, 21),
  "conv5_1": (5, 24),
  "conv5_2": (5, 26),
  "conv5_3": (5, 28),
}
HEADS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")


def make_model():
  model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
  return model.eval()


def flaxvae_shapes(model):
  """flaxvae's flat keys with their shapes, read off the torch modules."""
  state = model.state_dict()
  shapes = {}
  for name, (block, index) in CONVS.items():
    out, cin, kh, kw = state[f"net.slice{block}.{index}.weight"].shape
    shapes[f"vgg16/{name}/kernel"] = (kh, kw, cin, out)
    shapes[f"vgg16/{name}/bias"] = (out,)
  for i, head in enumerate(HEADS):
    shapes[f"heads/{head}"] = (state[f"lin{i}.model.1.weight"].shape[1],)
  return shapes


def load_into(model, arrays, heads=True):
  state = {}
  for name, (block, index) in CONVS.items():
    kernel = arrays[f"vgg16/{name}/kernel"].transpose(3, 2, 0, 1)
    state[f"net.slice{block}.{index}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel))
    state[f"net.slice{block}.{index}.bias"] = torch.from_numpy(arrays[f"vgg16/{name}/bias"])
  if heads:
    for i, head in enumerate(HEADS):
      weight = arrays[f"heads/{head}"].reshape(1, -1, 1, 1)
      state[f"lin{i}.model.1.weight"] = torch.from_numpy(np.ascontiguousarray(weight))
  result = model.load_state_dict(state, strict=False)
  assert not result.unexpected_keys, result.unexpected_keys
  # lins.i is lin{i} under a second name, set with it
  set_here = ("net.", *(f"lin{i}." for i in range(len(HEADS)) if heads))
  missing = [k for k in result.missing_keys if k.startswith(set_here)]
  assert not missing, missing


def to11(images_uint8):
  return images_uint8.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def distances_and_gradients(model, x_uint8, y_uint8, dtype):
  """lpips distances [b] and d(sum)/dx [b, H, W, C] for NHWC uint8 pairs, in `dtype`."""
  model = model.to(dtype)

  def nchw(images):
    t = torch.from_numpy(to11(images)).to(dtype).permute(0, 3, 1, 2)
    return t.repeat(1, 3, 1, 1) if t.shape[1] == 1 else t

  x = torch.from_numpy(to11(x_uint8)).to(dtype).requires_grad_(True)
  x3 = x.permute(0, 3, 1, 2)
  x3 = x3.repeat(1, 3, 1, 1) if x3.shape[1] == 1 else x3
  d = model(x3, nchw(y_uint8)).reshape(-1)
  (grad,) = torch.autograd.grad(d.sum(), x)
  return d.detach().numpy(), grad.numpy()


def smooth(rng, n, h, w, c):
  """Random smooth uint8 images: coarse noise upsampled 4x and box-blurred."""
  coarse = rng.uniform(0, 255, (n, h // 4 + 1, w // 4 + 1, c))
  fine = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)[:, :h, :w]
  for axis in (1, 2):
    fine = (fine + np.roll(fine, 1, axis) + np.roll(fine, -1, axis)) / 3
  return fine


def distorted_pairs(rng, n, h, w, c):
  """(originals, others) uint8: noise, blur, a 2-pixel shift, and an unrelated image."""
  x = smooth(rng, n, h, w, c)
  kinds = [
    lambda a: a + rng.normal(0, 20, a.shape),
    lambda a: (a + np.roll(a, 1, 0) + np.roll(a, 1, 1) + np.roll(a, 1, (0, 1))) / 4,
    lambda a: np.roll(a, 2, 1),
    lambda a: smooth(rng, 1, h, w, c)[0],
  ]
  y = np.stack([kinds[i % len(kinds)](x[i]) for i in range(n)])
  as_uint8 = lambda a: np.clip(np.rint(a), 0, 255).astype(np.uint8)
  return as_uint8(x), as_uint8(y)


def write_random(model):
  arrays = lpips_random_weights.random_weights(flaxvae_shapes(model))
  load_into(model, arrays)
  rng = np.random.default_rng(2026)
  out = {"weights_checksum": lpips_random_weights.checksum(arrays)}
  cases = {
    "rgb": rng.integers(0, 256, (2, 2, 32, 32, 3), dtype=np.uint8),
    "odd": np.stack(distorted_pairs(rng, 2, 36, 44, 3)),
    "grey": np.stack(distorted_pairs(rng, 2, 32, 32, 1)),
    # Fashion-MNIST's size: relu5_3's block runs on 1x1 maps (flaxvae's matrix-product path)
    "grey28": np.stack(distorted_pairs(rng, 2, 28, 28, 1)),
  }
  for case, (x, y) in cases.items():
    d32, g32 = distances_and_gradients(model, x, y, torch.float32)
    d64, _ = distances_and_gradients(model, x, y, torch.float64)
    out.update({f"{case}_x": x, f"{case}_y": y, f"{case}_lpips": d32, f"{case}_lpips64": d64})
    if case.startswith("grey"):
      out[f"{case}_grad"] = g32
  np.savez_compressed(OUT / "random.npz", **out)
  return {k: v for k, v in out.items() if k.endswith("lpips")}


def write_pretrained(model, path):
  with np.load(path) as data:
    arrays = {k: data[k] for k in data.files if not k.startswith("__")}
  state = make_model().state_dict()  # lpips' own heads, from its vgg.pth
  for i, head in enumerate(HEADS):
    theirs = state[f"lin{i}.model.1.weight"].numpy().reshape(-1)
    assert np.array_equal(theirs, arrays[f"heads/{head}"]), f"head {head} differs from vgg.pth"
  load_into(model, arrays, heads=False)
  rng = np.random.default_rng(34)
  out = {}
  for case, shape in (("rgb", (4, 64, 64, 3)), ("grey", (2, 32, 32, 1))):
    x, y = distorted_pairs(rng, *shape)
    d32, g32 = distances_and_gradients(model, x, y, torch.float32)
    d64, _ = distances_and_gradients(model, x, y, torch.float64)
    out.update({f"{case}_x": x, f"{case}_y": y, f"{case}_lpips": d32, f"{case}_lpips64": d64})
    if case == "grey":
      out[f"{case}_grad"] = g32
  np.savez_compressed(OUT / "pretrained.npz", **out)
  return {k: v for k, v in out.items() if k.endswith("lpips")}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--weights", default=DEFAULT_WEIGHTS, help="flaxvae's lpips_vgg16.npz")
  args = parser.parse_args()
  torch.manual_seed(0)
  torch.set_num_threads(2)
  OUT.mkdir(parents=True, exist_ok=True)
  print("random:", write_random(make_model()))
  print("pretrained:", write_pretrained(make_model(), args.weights))
  print(f"lpips {metadata.version('lpips')}, torch {torch.__version__}: wrote {OUT}")


if __name__ == "__main__":
  main()
