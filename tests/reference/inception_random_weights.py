"""Random Inception-v3 weights drawn from a fixed numpy seed, in PyTorch's layouts (NVIDIA's
TorchScript names or pytorch-fid's state dict names): the PyTorch reference
(inception_reference.py) loads them into its models and flaxvae's parity test
(tests/eval/test_inception.py) converts them, so the fixture holds only images and outputs and
`make test` needs neither torch nor the pretrained weights. Pure numpy, so it runs in either venv.

Each tensor is drawn from its own stream, seeded by the seed and its name, so a tensor's values
do not depend on which other tensors are drawn: a converter that maps a name onto the wrong layer
gets other values there and fails the parity test. Convolution kernels are He-scaled normals
(activations keep their size through 94 ReLU layers); BatchNorm statistics and offsets are small
normals, variances uniform in [0.5, 1.5), pytorch-fid's BatchNorm scales near 1.
"""

import zlib

import numpy as np

SEED = 34


def random_tensor(name, shape, seed=SEED):
  """float32 values for the tensor `name` of `shape` (PyTorch layout)."""
  rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
  shape = tuple(shape)
  if name.endswith(".weight") and len(shape) == 4:  # a convolution kernel, OIHW
    value = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
  elif name.endswith(("var", "running_var")):
    value = rng.uniform(0.5, 1.5, shape)
  elif name.endswith("bn.weight"):
    value = 1.0 + 0.1 * rng.standard_normal(shape)
  else:  # BatchNorm offsets and means, pytorch-fid's unused classifier
    value = 0.1 * rng.standard_normal(shape)
  return value.astype(np.float32)


def random_state(shapes, seed=SEED):
  """{name: float32 array} for `shapes` ({name: shape})."""
  return {name: random_tensor(name, shape, seed) for name, shape in shapes.items()}
