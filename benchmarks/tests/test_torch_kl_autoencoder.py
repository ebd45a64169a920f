"""benchmarks/torch_kl_autoencoder.py, the latent autoencoder's PyTorch twin, in its own venv
(.venv-ref: torch, torchvision, lpips, diffusers; `make bench` builds it). Skipped where that venv
is missing. The twin's step must be the step it claims: both ways of computing LDM's adaptive
weight give the same gradients, and LPIPS on flaxvae's weights file gives flaxvae's distances.
The report's section (benchmarks/report.py, part klae) is tested without either side."""

import json
import os
import subprocess

import numpy as np
import pytest
from scripts import load_script

from tests.conftest import REPO

REF_PYTHON = REPO / ".venv-ref" / "bin" / "python"
TWIN = REPO / "benchmarks" / "torch_kl_autoencoder.py"

needs_ref_venv = pytest.mark.skipif(
  not REF_PYTHON.exists(), reason="no .venv-ref (make .venv-ref/.installed builds it)"
)


def run_twin_code(code, timeout=300):
  """Runs `code` in the twin's venv with the twin imported as `twin`; its last line of output."""
  prelude = (
    "import importlib.util, json, sys\n"
    f"spec = importlib.util.spec_from_file_location('twin', {str(TWIN)!r})\n"
    "twin = importlib.util.module_from_spec(spec); spec.loader.exec_module(twin)\n"
  )
  result = subprocess.run(
    [str(REF_PYTHON), "-c", prelude + code],
    capture_output=True,
    text=True,
    timeout=timeout,
    check=True,
  )
  return result.stdout.strip().splitlines()[-1]


def random_lpips_weights(path):
  """A weights file in flaxvae's lpips_vgg16 layout with He-scaled random values."""
  from flaxvae import weights
  from flaxvae.objectives import perceptual

  rng = np.random.default_rng(0)
  arrays = {}
  for key, shape in perceptual.weight_shapes().items():
    fan_in = np.prod(shape[:-1]) if key.endswith("kernel") else 1
    scale = np.sqrt(2.0 / fan_in) if key.endswith("kernel") else 0.1
    arrays[key] = (scale * np.abs(rng.standard_normal(shape))).astype(np.float32)
  return weights.save(perceptual.NAME, arrays, str(path))


@needs_ref_venv
@pytest.mark.parametrize("phase", ["before", "after"])
def test_the_twin_times_its_step_and_prints_its_json_line(tmp_path, phase):
  flags = ["--phase", phase, "--batch", "2", "--steps", "1", "--windows", "1", "--warmup", "1"]
  result = subprocess.run(
    [str(REF_PYTHON), str(TWIN), *flags],
    capture_output=True,
    text=True,
    timeout=300,
    check=True,
    cwd=tmp_path,
    env=dict(os.environ, FLAXVAE_WEIGHTS_DIR=str(tmp_path)),  # no weights file: random VGG
  )
  row = json.loads(result.stdout.strip().splitlines()[-1])
  assert row["impl"] == "torch_klae" and row["phase"] == phase and row["batch_size"] == 2
  assert row["examples_per_s"] > 0 and row["flops_per_example"] > 0 and 0 < row["mfu"]
  assert row["lpips_weights"] == "random backbone" and np.isfinite(row["loss"])
  assert (row["d_loss"] > 0) == (phase == "after")  # the hinge loss starts near 1


@needs_ref_venv
def test_both_ways_of_computing_the_adaptive_weight_give_the_same_gradients():
  """LDM's two autograd.grad calls back to the last kernel, and the gradients taken at the
  decoder's output with one backward pass, must update both players identically."""
  code = """
import torch
grads = {}
for mode in ("ldm", "at_output"):
  torch.manual_seed(0)
  step = twin.Step("after", mode, "", batch=4)
  step.vae_opt.step = step.disc_opt.step = lambda: None
  x = 2 * torch.rand(4, 1, 28, 28) - 1
  torch.manual_seed(1)  # the posterior's draw
  step(x)
  grads[mode] = [p.grad.clone() for m in (step.vae, step.discriminator) for p in m.parameters()]
# Biases followed by a normalisation (and attention's key bias) have a zero gradient up to
# rounding: each tensor is compared against its own scale plus a small part of the largest.
largest = max(float(g.abs().max()) for g in grads["ldm"])
worst = max(
  float((a - b).abs().max() / (b.abs().max() + 1e-3 * largest)) for a, b in zip(*grads.values())
)
print(json.dumps({"tensors": len(grads["ldm"]), "worst_relative": worst}))
"""
  result = json.loads(run_twin_code(code))
  assert result["tensors"] > 50 and result["worst_relative"] < 1e-3


@needs_ref_venv
def test_the_twins_lpips_on_flaxvaes_weights_file_gives_flaxvaes_distances(tmp_path):
  """The twin loads flaxvae's converted LPIPS file into the `lpips` package's model (HWIO ->
  OIHW, the heads), so both frameworks compute the same distances on the same weights."""
  import jax.numpy as jnp

  from flaxvae.objectives import perceptual

  path = random_lpips_weights(tmp_path / "lpips_vgg16.npz")
  rng = np.random.default_rng(1)
  x11, y11 = (rng.uniform(-1, 1, (3, 16, 16, 1)).astype(np.float32) for _ in range(2))
  np.savez(tmp_path / "images.npz", x=x11, y=y11)
  code = f"""
import numpy as np, torch
model, origin = twin.perceptual_model({str(path)!r})
images = np.load({str(tmp_path / "images.npz")!r})
x, y = (torch.from_numpy(images[k]).permute(0, 3, 1, 2).repeat(1, 3, 1, 1) for k in "xy")
print(json.dumps({{"origin": origin, "distances": model(x, y).flatten().tolist()}}))
"""
  result = json.loads(run_twin_code(code))
  expected = perceptual.lpips(perceptual.load_lpips_weights(str(path)), x11, y11)
  assert result["origin"] == str(path)
  np.testing.assert_allclose(result["distances"], np.asarray(expected), rtol=1e-4, atol=1e-6)
  assert float(jnp.min(expected)) > 0


def test_the_report_compares_each_phase_with_its_faster_twin():
  """BENCHMARKS.md's klae section: flaxvae against the faster of the twin's two adaptive-weight
  paths on each side of the discriminator's start, each row with its command."""
  report = load_script("report")
  flaxvae = dict(impl="flaxvae_klae", flops_per_example=3e9, mfu=0.3, command="cases")
  twin = dict(impl="torch_klae", flops_per_example=2e9, mfu=0.2)
  rows = [
    dict(flaxvae, phase="before", examples_per_s=6.0, round_examples_per_s=[6, 5]),
    dict(flaxvae, phase="after", examples_per_s=4.0, round_examples_per_s=[4, 4]),
    dict(twin, phase="before", adaptive_weight="ldm", examples_per_s=4.0, command="twin b"),
    dict(twin, phase="after", adaptive_weight="ldm", examples_per_s=2.0, command="twin l"),
    dict(twin, phase="after", adaptive_weight="at_output", examples_per_s=2.5, command="twin o"),
  ]
  rows = [dict(r, round_examples_per_s=[r["examples_per_s"]]) for r in rows] + [
    dict(
      case="profile",
      phase="after",
      steps=2,
      threads=2,
      busy_ms_per_step=8.0,
      wall_ms_per_step=9.0,
      ms_per_step_by_kind={"convolution": 8.0},
      share_by_kind={"convolution": 1.0},
      heaviest=[dict(op="convolution.1", shape="f32[8]", ms_per_step=1.0)],
      command="profile",
    )
  ]
  text = "\n".join(report.render_klae(rows))
  assert "**1.50** before the discriminator's start and **1.60** after it" in text
  assert (
    "| after | torch twin, LDM's adaptive weight (autograd.grad to the last kernel) | 2.0 "
    "| 2.00 | 2.0 | 0.2 | `twin l` |" in text
  )
  assert '"torch_klae after at_output": [2.5]' in text and "Command: `profile`" in text
