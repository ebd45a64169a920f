"""Writes tests/fixtures/diffusers_vae/: diffusers' AutoencoderKL in the four published
configurations' layouts (SD 1.x, SDXL, SD3, FLUX.1), small, on random weights, as diffusers saves
them (config.json + diffusion_pytorch_model.safetensors via save_pretrained), plus outputs.npz
with images and diffusers' outputs at an even and an odd image size. tests/interop/
test_vae_weights.py imports each with flaxvae's importer and checks the numbers, so `make test`
needs no torch. Rerun with `make parity-fixtures` (the reference venv, .venv-ref).

Each configuration keeps its structural features at small widths (block_out_channels 4, 8,
GroupNorm groups of 2): SD 1.x and SDXL 4 latent channels with quant convs (SDXL with two ResNet
blocks per level), SD3 and FLUX.1 16 latent channels without them, and each its scaling and
shift factors. Every weight, GroupNorm's scales and biases too, is random (the existing
autoencoder_kl fixture's `random_state`), so a swapped pair cannot hide behind ones and zeros.
The weights are stored in float32; the reference computes in float64 from them and stores its
outputs rounded to float32 (the comparison's tolerance is 1e-5).

SD 1.x is also stored in LDM's original layout (first_stage_model.* keys, 1x1-conv attention,
decoder levels in LDM's order), made here by the inverse of diffusers' map and checked against
diffusers' own converter (convert_ldm_vae_checkpoint), so the LDM importer meets a file that
diffusers reads as these weights.
"""

import json
import pathlib
import re

import numpy as np

from tests.reference.autoencoder_kl_diffusers import random_state

OUT = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "diffusers_vae"
SIZES = (16, 15)  # an even and an odd side (the odd one pads asymmetrically at each level)
SMALL = dict(
  block_out_channels=(4, 8),
  down_block_types=("DownEncoderBlock2D",) * 2,
  up_block_types=("UpDecoderBlock2D",) * 2,
  norm_num_groups=2,
  sample_size=16,
)
NO_QUANT_CONVS = dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
CONFIGS = {
  "sd1": dict(layers_per_block=1, latent_channels=4, scaling_factor=0.18215),
  "sdxl": dict(layers_per_block=2, latent_channels=4, scaling_factor=0.13025, force_upcast=True),
  "sd3": dict(layers_per_block=1, **NO_QUANT_CONVS, scaling_factor=1.5305, shift_factor=0.0609),
  "flux": dict(layers_per_block=1, **NO_QUANT_CONVS, scaling_factor=0.3611, shift_factor=0.1159),
}
SEEDS = {"sd1": 351, "sdxl": 352, "sd3": 353, "flux": 354}
LDM_FILE = "sd1_ldm.safetensors"


def diffusers_to_ldm(state, levels):
  """diffusers' VAE keys -> LDM's (first_stage_model.*), attention weights as 1x1 convs."""
  renames = {  # plain substrings, diffusers' -> LDM's
    ".mid_block.resnets.0.": ".mid.block_1.",
    ".mid_block.resnets.1.": ".mid.block_2.",
    ".mid_block.attentions.0.": ".mid.attn_1.",
    ".conv_norm_out.": ".norm_out.",
    ".conv_shortcut.": ".nin_shortcut.",
    ".group_norm.": ".norm.",
    ".to_q.": ".q.",
    ".to_k.": ".k.",
    ".to_v.": ".v.",
    ".to_out.0.": ".proj_out.",
  }
  down_kinds = {"resnets": "block", "attentions": "attn", "downsamplers.0": "downsample"}
  out = {}
  for key, value in state.items():
    up = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets|attentions|upsamplers\.0)\.(.*)", key)
    down = re.match(r"encoder\.down_blocks\.(\d+)\.(resnets|attentions|downsamplers\.0)\.(.*)", key)
    new = key
    if up:
      kind = {"resnets": "block", "attentions": "attn", "upsamplers.0": "upsample"}[up[2]]
      new = f"decoder.up.{levels - 1 - int(up[1])}.{kind}.{up[3]}"
    elif down:
      new = f"encoder.down.{down[1]}.{down_kinds[down[2]]}.{down[3]}"
    for old, replacement in renames.items():
      new = new.replace(old, replacement)
    attention = re.search(r"\.(mid\.attn_1|attn\.\d+)\.(q|k|v|proj_out)\.weight$", new)
    out["first_stage_model." + new] = value[:, :, None, None] if attention else value
  return out


def main():
  import diffusers  # the reference venv only
  import safetensors.numpy
  import torch
  from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

  OUT.mkdir(parents=True, exist_ok=True)
  outputs = {"diffusers_version": np.asarray(diffusers.__version__)}
  rng = np.random.default_rng(35)
  for name, options in CONFIGS.items():
    model = diffusers.AutoencoderKL(**SMALL, **options)
    keys, shapes = list(model.state_dict()), [tuple(v.shape) for v in model.state_dict().values()]
    state = random_state(keys, shapes, seed=SEEDS[name])
    model.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in state.items()})
    model.save_pretrained(OUT / name, safe_serialization=True)
    if name == "sd1":
      ldm = diffusers_to_ldm({k: v.astype(np.float32) for k, v in state.items()}, 2)
      back = convert_ldm_vae_checkpoint(
        {k: torch.from_numpy(v) for k, v in ldm.items()}, dict(model.config)
      )
      assert sorted(back) == sorted(keys), sorted(set(back) ^ set(keys))
      for key in keys:
        assert np.array_equal(back[key].numpy(), state[key].astype(np.float32)), key
      safetensors.numpy.save_file(ldm, str(OUT / LDM_FILE))
    model = model.double().eval()
    for size in SIZES:
      x = rng.uniform(-1, 1, (2, 3, size, size)).astype(np.float32).astype(np.float64)
      with torch.no_grad():
        posterior = model.encode(torch.from_numpy(x)).latent_dist
        decoded = model.decode(posterior.mean).sample
        forward = model(torch.from_numpy(x), sample_posterior=False).sample
      prefix = f"{name}/{size}"
      outputs[f"{prefix}/x11"] = np.float32(x)
      outputs[f"{prefix}/mean"] = np.float32(posterior.mean.numpy())
      outputs[f"{prefix}/logvar"] = np.float32(posterior.logvar.numpy())
      outputs[f"{prefix}/decoded"] = np.float32(decoded.numpy())
      outputs[f"{prefix}/forward"] = np.float32(forward.numpy())
  np.savez_compressed(OUT / "outputs.npz", **outputs)
  total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
  print(f"wrote {OUT} ({total} bytes) with diffusers {diffusers.__version__}")
  print(
    json.dumps(
      {n: json.loads((OUT / n / "config.json").read_text())["_class_name"] for n in CONFIGS}
    )
  )


if __name__ == "__main__":
  main()
