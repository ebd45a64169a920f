"""diffusers' and LDM's KL autoencoder weights in and out of flaxvae (issue 35).

Parity: the fixtures of tests/reference/diffusers_vae_configs.py (diffusers 0.42.1's
AutoencoderKL in the SD 1.x, SDXL, SD3 and FLUX.1 layouts on random weights, saved as diffusers
saves them) imported by flaxvae's importer give diffusers' encoder mean and log-variance,
decoder output and full forward within 1e-5 (relative and absolute) at the highest matmul
precision, at an even and an odd image size; LDM's layout of the same weights imports to the
same parameters bitwise; export(import(w)) is w bitwise; mismatched weights are refused in one
line naming the key and both shapes; an import is a run directory that `flaxvae.load`,
evaluation, export and a decoder-only fine-tuning through train() read.
"""

import functools
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flaxvae as flaxvae_package
from flaxvae import api, cli
from flaxvae.errors import ConfigError, UsageError
from flaxvae.interop import runs, safetensors, vae_weights
from tests.reference import diffusers_vae_configs as reference

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "diffusers_vae"
DIFFUSERS_VERSION = "0.42.1"  # what wrote the fixtures (outputs.npz says so too)
CONFIGS = list(reference.CONFIGS)
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


@functools.cache
def outputs():
  return dict(np.load(FIXTURES / "outputs.npz"))


@functools.cache
def imported(name):
  """(model, scaling) of a fixture, and its encode -> decode under one jit."""
  model, scaling = runs.build_model(str(FIXTURES / name))
  graphdef, state = nnx.split(model)

  def encode_decode(state, x01):
    model = nnx.merge(graphdef, state)
    mean, logvar = model.encode(x01)
    return mean, logvar, model.decode(mean)

  return model, scaling, jax.jit(encode_decode), state


def nchw(a):
  return np.transpose(np.asarray(a, np.float64), (0, 3, 1, 2))


def pure_params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_the_fixtures_are_diffusers_0_42_1s():
  assert str(outputs()["diffusers_version"]) == DIFFUSERS_VERSION


@pytest.mark.parametrize("size", reference.SIZES, ids=["even", "odd"])
@pytest.mark.parametrize("name", CONFIGS)
def test_matches_diffusers_at_float32(name, size):
  _, _, encode_decode, state = imported(name)
  expected = {k: outputs()[f"{name}/{size}/{k}"] for k in ("mean", "logvar", "decoded", "forward")}
  x01 = (np.transpose(outputs()[f"{name}/{size}/x11"], (0, 2, 3, 1)) + 1.0) / 2.0
  with jax.default_matmul_precision("highest"):
    mean, logvar, raw = encode_decode(state, jnp.asarray(x01, jnp.float32))
  out11 = 2.0 * nchw(raw[..., 0::2]) - 1.0  # the laplace mean (out11 + 1) / 2, back
  got = {"mean": nchw(mean), "logvar": nchw(logvar), "decoded": out11, "forward": out11}
  for key, value in got.items():
    np.testing.assert_allclose(value, expected[key], **TOLERANCE, err_msg=f"{name} {key}")


@pytest.mark.parametrize(
  "name, latent_channels, quant, scaling, shift",
  [
    ("sd1", 4, True, 0.18215, None),
    ("sdxl", 4, True, 0.13025, None),
    ("sd3", 16, False, 1.5305, 0.0609),
    ("flux", 16, False, 0.3611, 0.1159),
  ],
)
def test_each_configuration_maps_to_its_options(name, latent_channels, quant, scaling, shift):
  model, found, _, _ = imported(name)
  assert model.latent_channels == latent_channels and (model.quant_conv is not None) == quant
  assert found == {"scaling_factor": scaling, "shift_factor": shift}


def test_ldm_layout_imports_to_the_same_parameters_bitwise():
  """The SD 1.x fixture in LDM's layout (first_stage_model.*, 1x1-conv attention, LDM's order of
  the decoder's levels), which diffusers' own converter reads as the same weights."""
  ldm, _ = runs.build_model(str(FIXTURES / reference.LDM_FILE), image_size=16, norm_groups=2)
  diffusers_model = imported("sd1")[0]
  pairs = zip(jax.tree.leaves(pure_params(ldm)), jax.tree.leaves(pure_params(diffusers_model)))
  assert all(np.array_equal(a, b) for a, b in pairs)


@pytest.mark.parametrize("name", CONFIGS)
def test_export_of_import_is_bitwise(name, tmp_path):
  original = safetensors.read(FIXTURES / name / vae_weights.WEIGHTS_FILE)
  exported = vae_weights.params_to_diffusers(pure_params(imported(name)[0]))
  path = tmp_path / "w.safetensors"
  safetensors.write(path, exported)
  again = safetensors.read(path)
  assert sorted(again) == sorted(original)
  for key, value in original.items():
    assert again[key].dtype == value.dtype and again[key].tobytes() == value.tobytes(), key


# -- refusals ------------------------------------------------------------------------------------
def source_with(tmp_path, weights="sd1", config="sd1", edit=None, config_edit=None):
  """A diffusers folder of `weights`' tensors (edited) with `config`'s config.json (edited)."""
  state = safetensors.read(FIXTURES / weights / vae_weights.WEIGHTS_FILE)
  cfg = json.loads((FIXTURES / config / "config.json").read_text())
  (edit or (lambda s: None))(state)
  (config_edit or (lambda c: None))(cfg)
  return vae_weights.write_diffusers(str(tmp_path / "source"), state, cfg)


@pytest.mark.parametrize(
  "case, words",
  [
    (
      dict(weights="sd1", config="sd3"),
      r"decoder\.conv_in\.weight has shape \(8, 4, 3, 3\) but this configuration needs "
      r"\(8, 16, 3, 3\)",
    ),
    (
      dict(edit=lambda s: s.pop("encoder.conv_out.bias")),
      r"no weight encoder\.conv_out\.bias, which this configuration needs with shape \(8\)",
    ),
    (
      dict(edit=lambda s: s.update({"encoder.extra.weight": np.zeros(3, np.float32)})),
      r"weight encoder\.extra\.weight \(3\) has no place in this configuration",
    ),
    (dict(config_edit=lambda c: c.update(act_fn="gelu")), r"act_fn 'gelu' is not silu"),
    (
      dict(config_edit=lambda c: c.update(use_post_quant_conv=False)),
      r"use_quant_conv and use_post_quant_conv differ",
    ),
  ],
  ids=["shape", "missing", "extra", "activation", "quant_convs"],
)
def test_mismatched_weights_are_refused_in_one_line(tmp_path, case, words):
  source = source_with(tmp_path, **case)
  with pytest.raises(ConfigError, match=words) as e:
    runs.build_model(source)
  assert "\n" not in str(e.value)


def test_a_torch_pickle_without_torch_and_a_missing_source_are_one_line(tmp_path):
  ckpt = tmp_path / "model.ckpt"
  ckpt.write_bytes(b"not read")
  try:
    import torch  # noqa: F401
  except ImportError:
    with pytest.raises(ConfigError, match=r"torch pickle, and reading it needs torch") as e:
      runs.build_model(str(ckpt))
    assert "\n" not in str(e.value)
  with pytest.raises(ConfigError, match="no such file or directory"):
    runs.build_model(str(tmp_path / "absent"))


# -- run directories -------------------------------------------------------------------------------
def flaxvae(*args):
  status = cli.main(["flaxvae", *args])
  assert status in (0, None), status


def test_import_load_and_export_through_the_command(tmp_path, capsys):
  """SD3's layout: import-weights writes a run that flaxvae.load reads (encode and decode give
  diffusers' numbers, also at the odd size), export-weights writes the same tensors and the
  latent normalisation, latent-stats' figures once measured."""
  workdir, dest = tmp_path / "run", tmp_path / "exported"
  flaxvae("import-weights", str(FIXTURES / "sd3"), f"--workdir={workdir}")
  model = api.load(str(workdir))
  for size in reference.SIZES:
    x01 = (np.transpose(outputs()[f"sd3/{size}/x11"], (0, 2, 3, 1)) + 1.0) / 2.0
    with jax.default_matmul_precision("highest"):
      mean, logvar = model.encode(x01)
      image = model.decode(mean)
    np.testing.assert_allclose(nchw(mean), outputs()[f"sd3/{size}/mean"], **TOLERANCE)
    np.testing.assert_allclose(nchw(logvar), outputs()[f"sd3/{size}/logvar"], **TOLERANCE)
    np.testing.assert_allclose(
      2.0 * nchw(image) - 1.0, outputs()[f"sd3/{size}/decoded"], **TOLERANCE
    )
  (workdir / runs.LATENT_STATS_FILE).write_text(
    json.dumps({"latent_scale": 2.5, "latent_shift": 0.25, "latent_scale_ldm": 2.5})
  )
  flaxvae("export-weights", f"--workdir={workdir}", str(dest))
  original = safetensors.read(FIXTURES / "sd3" / vae_weights.WEIGHTS_FILE)
  exported = safetensors.read(dest / vae_weights.WEIGHTS_FILE)
  assert all(exported[k].tobytes() == v.tobytes() for k, v in original.items())
  assert sorted(exported) == sorted(original)
  config = json.loads((dest / "config.json").read_text())
  expected = json.loads((FIXTURES / "sd3" / "config.json").read_text())
  assert config == {**expected, "scaling_factor": 2.5, "shift_factor": 0.25}
  with pytest.raises(UsageError, match="already holds checkpoints"):
    api.import_weights(str(FIXTURES / "sd3"), str(workdir))


def test_export_refuses_a_model_that_is_not_a_kl_autoencoder(tmp_path, monkeypatch):
  class NotKL:
    settings = type("S", (), {"model": type("M", (), {"name": "mlp"})()})()

  monkeypatch.setattr(api, "load", lambda workdir, step=None: NotKL())
  with pytest.raises(ConfigError, match="holds model 'mlp', not autoencoder_kl"):
    api.export_weights(str(tmp_path), str(tmp_path / "out"))


def test_a_copied_pipeline_folder_reads_its_vae_subfolder(tmp_path):
  shutil.copytree(FIXTURES / "flux", tmp_path / "pipeline" / "vae")
  _, scaling = runs.build_model(str(tmp_path / "pipeline"))
  assert scaling == {"scaling_factor": 0.3611, "shift_factor": 0.1159}


def test_the_package_serves_import_and_export_lazily():
  assert flaxvae_package.import_weights is api.import_weights
  assert flaxvae_package.export_weights is api.export_weights
