"""benchmarks/peer_mlp_vae.py, the MLP peers of BENCHMARKS.md, on a few random images."""

import gzip
import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, random_images


def write_idx(folder, split, count):
  """Fashion-MNIST's IDX image file layout: a 16-byte header, then uint8 pixels."""
  name = f"{'train' if split == 'train' else 't10k'}-images-idx3-ubyte.gz"
  header = np.array([2051, count, 28, 28], ">i4").tobytes()
  with gzip.open(folder / name, "wb") as f:
    f.write(header + random_images(count, seed=len(split)).tobytes())


@pytest.mark.parametrize("impl", ["flax_jit", "flax_scan"])
def test_a_jax_peer_trains_and_prints_its_json_line(tmp_path, impl):
  write_idx(tmp_path, "train", 2 * 128 + 5)  # two batches an epoch, the rest dropped
  write_idx(tmp_path, "test", 16)
  result = subprocess.run(
    [
      sys.executable,
      str(REPO / "benchmarks" / "peer_mlp_vae.py"),
      impl,
      "--data",
      str(tmp_path),
      "--epochs",
      "2",
    ],
    capture_output=True,
    text=True,
    timeout=300,
    check=True,
  )
  row = json.loads(result.stdout.strip().splitlines()[-1])
  assert row["impl"] == impl and row["epochs"] == 2 and row["examples_per_s"] > 0
  assert 0 < row["test_neg_elbo"] < 784 * np.log(2) * 2  # finite, near a coin flip per pixel
