"""benchmarks/conv_kernels.py (the convolution figures of docs/performance.md), jax side."""

import json
import subprocess
import sys

import pytest
from scripts import load_script

from tests.conftest import REPO


def test_conv_kernels_times_each_shape_and_totals_them_by_count(tmp_path):
  """benchmarks/conv_kernels.py (the README's convolution figures), jax side, on tiny shapes."""
  result = subprocess.run(
    [
      sys.executable,
      str(REPO / "benchmarks" / "conv_kernels.py"),
      "--shapes",
      "3:4:4:4:3,1:4:4:8:2,3:2:4:2:1",
      "--batch",
      "2",
    ],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=300,
    check=True,
  )
  row = json.loads(result.stdout.strip().splitlines()[-1])
  assert row["impl"] == "jax" and [s["count"] for s in row["shapes"]] == [3, 2, 1]
  assert set(row["step_total"]) == {"3x3", "1x1"}
  three = [s for s in row["shapes"] if s["kernel"] == 3]
  assert row["step_total"]["3x3"]["forward_backward_ms"] == pytest.approx(
    sum(s["count"] * s["forward_backward_ms"] for s in three), abs=0.01
  )
  assert all(0 < s["forward_ms"] for s in row["shapes"])


def test_conv_kernels_shapes_are_the_vdvae_configs_convolutions():
  conv_kernels = load_script("conv_kernels")
  assert conv_kernels.model_shapes(str(REPO / "configs" / "fashion_mnist_vdvae.py")) == (
    conv_kernels.SHAPES
  )
