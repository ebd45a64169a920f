"""LPIPS weights of VGG16's and the heads' shapes drawn from a fixed numpy seed: the PyTorch
reference (lpips_reference.py) and flaxvae's parity test (tests/objectives/test_perceptual.py)
both make them, so the stored fixture holds only images and distances and `make test` needs
neither torch nor the pretrained weights. Pure numpy, so it runs in either venv.

Kernels are He-scaled normals (activations keep their size through 13 ReLU layers), biases small
normals, heads uniform in [0, 1) (non-negative, as lpips' trained heads). Arrays are drawn in the
order of their sorted keys, and the fixture stores a checksum of them, so a numpy whose streams
differ fails loudly instead of as a parity error.
"""

import numpy as np

SEED = 34


def random_weights(shapes, seed=SEED):
  """{flat key: float32 array} for `shapes` ({flat key: shape}, flaxvae's LPIPS layout)."""
  rng = np.random.default_rng(seed)
  arrays = {}
  for key in sorted(shapes):
    shape = tuple(shapes[key])
    if key.endswith("/kernel"):
      fan_in = shape[0] * shape[1] * shape[2]
      value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
    elif key.endswith("/bias"):
      value = rng.standard_normal(shape) * 0.05
    else:
      value = rng.uniform(0.0, 1.0, shape)
    arrays[key] = value.astype(np.float32)
  return arrays


def checksum(arrays):
  """A float64 sum of |value| per key, in sorted key order: equal draws give equal sums."""
  return np.array([np.abs(arrays[key].astype(np.float64)).sum() for key in sorted(arrays)])
