"""diffusers' AutoencoderKL and LDM's first-stage weights <-> autoencoder_kl's parameters.

Why: the published latent autoencoders (SD 1.x, SDXL, SD3, FLUX.1) ship as diffusers'
safetensors + config.json or inside LDM's checkpoints; autoencoder_kl names its modules as
diffusers does (module docstring there), so the conversion is a name map plus layouts:
  conv weight OIHW -> kernel HWIO, Linear weight [out, in] -> kernel [in, out] (LDM's 1x1 conv
  attention weights are squeezed to Linear first, as diffusers' converter does), GroupNorm
  weight -> scale, the attention's to_out.0 -> to_out, diffusers' pre-0.14 attention names
  (query, key, value, proj_attn) -> to_q, to_k, to_v, to_out.0.
Everything here is numpy over {name: array} dicts: no torch, no device. The configuration comes
from diffusers' config.json (`options_from_diffusers_config`), or, for LDM's checkpoints and a
bare safetensors file, from the weights' shapes (`infer_diffusers_config`).
"""

import json
import os
import re

import numpy as np

from flaxvae.errors import ConfigError
from flaxvae.interop import safetensors

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
CONFIG_FILE = "config.json"
LDM_PREFIX = "first_stage_model."
DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# The published configurations' latent normalisation, (z - shift) * scale (diffusers' configs).
KNOWN_SCALINGS = {
  "SD 1.x": (0.18215, None),
  "SDXL": (0.13025, None),
  "SD3": (1.5305, 0.0609),
  "FLUX.1": (0.3611, 0.1159),
}
MODEL_KEYS = (
  "channels",
  "channel_multipliers",
  "num_res_blocks",
  "attention_resolutions",
  "latent_channels",
  "use_quant_conv",
  "norm_groups",
)


# -- names ---------------------------------------------------------------------------------------
def diffusers_name(path):
  """Our pure-dict path (tuple of str/int) -> diffusers' state-dict key."""
  *modules, leaf = (str(p) for p in path)
  modules = [m if m != "to_out" else "to_out.0" for m in modules]
  return ".".join([*modules, {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)])


def flatten(params, prefix=()):
  """{path tuple: array} of a nested pure dict (list indices as ints)."""
  out = {}
  for key, value in params.items():
    if isinstance(value, dict):
      out.update(flatten(value, (*prefix, key)))
    else:
      out[(*prefix, key)] = value
  return out


def unflatten(flat):
  out = {}
  for path, value in flat.items():
    node = out
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = value
  return out


def to_flax_layout(path, array):
  """diffusers' array -> ours: conv weights OIHW -> HWIO, Linear weights transposed."""
  if path[-1] != "kernel":
    return array
  return array.T if array.ndim == 2 else array.transpose(2, 3, 1, 0)


def to_torch_layout(path, array):
  if path[-1] != "kernel":
    return array
  return array.T if array.ndim == 2 else array.transpose(3, 2, 0, 1)


def torch_shape(path, shape):
  return tuple(to_torch_layout(path, np.empty(shape, np.uint8)).shape)


def _shape(shape):
  return "(" + ", ".join(str(d) for d in shape) + ")"


# -- diffusers and LDM state dicts ------------------------------------------------------------
def modern_attention_names(state):
  """diffusers' pre-0.14 attention names (query/key/value/proj_attn) -> today's."""
  pattern = re.compile(r"\.attentions\.(\d+)\.(query|key|value|proj_attn)\.")
  return {
    pattern.sub(lambda m: f".attentions.{m[1]}.{DEPRECATED_ATTENTION[m[2]]}.", k): v
    for k, v in state.items()
  }


def ldm_to_diffusers(state):
  """LDM's first-stage names (encoder.down.{i}.block.{j}, mid.attn_1, decoder.up.{k}, ...) ->
  diffusers' (LDM's up.{k} is diffusers' up_blocks.{n - 1 - k}); LDM's 1x1-conv attention
  weights squeezed to Linear. Keys outside the autoencoder (loss.*, the diffusion model) are
  dropped; a full LDM/SD checkpoint's first_stage_model.* prefix is removed."""
  if any(k.startswith(LDM_PREFIX) for k in state):
    state = {k[len(LDM_PREFIX) :]: v for k, v in state.items() if k.startswith(LDM_PREFIX)}
  state = {
    k: v
    for k, v in state.items()
    if k.split(".")[0] in ("encoder", "decoder", "quant_conv", "post_quant_conv")
  }
  ups = {int(m[1]) for k in state for m in [re.match(r"decoder\.up\.(\d+)\.", k)] if m}
  last = max(ups, default=0)
  rules = [
    (r"^(encoder)\.down\.(\d+)\.block\.", r"\1.down_blocks.\2.resnets."),
    (r"^(encoder)\.down\.(\d+)\.attn\.", r"\1.down_blocks.\2.attentions."),
    (r"^(encoder)\.down\.(\d+)\.downsample\.", r"\1.down_blocks.\2.downsamplers.0."),
    (r"\.mid\.block_1\.", ".mid_block.resnets.0."),
    (r"\.mid\.block_2\.", ".mid_block.resnets.1."),
    (r"\.mid\.attn_1\.", ".mid_block.attentions.0."),
    (r"\.norm_out\.", ".conv_norm_out."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
    (r"(attentions\.\d+)\.norm\.", r"\1.group_norm."),
    (r"(attentions\.\d+)\.q\.", r"\1.to_q."),
    (r"(attentions\.\d+)\.k\.", r"\1.to_k."),
    (r"(attentions\.\d+)\.v\.", r"\1.to_v."),
    (r"(attentions\.\d+)\.proj_out\.", r"\1.to_out.0."),
  ]
  out = {}
  for key, value in state.items():
    up = re.match(r"decoder\.up\.(\d+)\.(block|attn|upsample)\.(.*)", key)
    if up:
      kind = {"block": "resnets.", "attn": "attentions.", "upsample": "upsamplers.0."}[up[2]]
      key = f"decoder.up_blocks.{last - int(up[1])}.{kind}{up[3]}"
    for pattern, replacement in rules:
      key = re.sub(pattern, replacement, key)
    if ".attentions." in key and key.endswith(".weight") and value.ndim == 4:
      value = value[:, :, 0, 0]  # LDM's 1x1 conv -> diffusers' Linear
    out[key] = value
  return out


def _indices(state, pattern):
  return sorted({int(m[1]) for k in state for m in [re.match(pattern, k)] if m})


def infer_diffusers_config(state, norm_groups=32):
  """diffusers' config.json fields that the weights' shapes determine (norm_num_groups cannot
  be read from shapes: LDM's and every published VAE's 32, or `norm_groups`)."""
  need = ["encoder.conv_in.weight", "decoder.conv_in.weight", "decoder.conv_out.weight"]
  missing = [k for k in need if k not in state]
  if missing:
    raise ConfigError(
      f"the weights have no {missing[0]}: they are not a KL autoencoder in diffusers' or LDM's "
      "layout (first_stage_model.encoder..., or encoder.down_blocks...)"
    )
  levels = _indices(state, r"encoder\.down_blocks\.(\d+)\.")
  widths = [int(state[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) for i in levels]
  attend = [any(f"encoder.down_blocks.{i}.attentions." in k for k in state) for i in levels]
  return {
    "_class_name": "AutoencoderKL",
    "in_channels": int(state["encoder.conv_in.weight"].shape[1]),
    "out_channels": int(state["decoder.conv_out.weight"].shape[0]),
    "block_out_channels": widths,
    "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attend],
    "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in attend][::-1],
    "layers_per_block": len(_indices(state, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")),
    "act_fn": "silu",
    "latent_channels": int(state["decoder.conv_in.weight"].shape[1]),
    "norm_num_groups": norm_groups,
    "use_quant_conv": "quant_conv.weight" in state,
    "use_post_quant_conv": "post_quant_conv.weight" in state,
    "mid_block_add_attention": True,
  }


def options_from_diffusers_config(cfg, where="config.json", sample_size=None):
  """(autoencoder_kl options, image_shape, latent normalisation {scaling_factor,
  shift_factor}) of diffusers' AutoencoderKL config; what autoencoder_kl cannot represent is a
  one-line ConfigError naming the field."""
  get = lambda key, default=None: cfg.get(key, default)
  widths = [int(w) for w in get("block_out_channels", (64,))]
  colors, out = int(get("in_channels", 3)), int(get("out_channels", 3))
  down = list(get("down_block_types", ["DownEncoderBlock2D"] * len(widths)))
  up = list(get("up_block_types", ["UpDecoderBlock2D"] * len(widths)))
  checks = [
    (colors == out, "in_channels and out_channels differ"),
    (get("act_fn", "silu") == "silu", f"act_fn {get('act_fn')!r} is not silu"),
    (get("mid_block_add_attention", True), "mid_block_add_attention is false"),
    (
      bool(get("use_quant_conv", True)) == bool(get("use_post_quant_conv", True)),
      "use_quant_conv and use_post_quant_conv differ",
    ),
    (len(down) == len(up) == len(widths), "block types and block_out_channels differ in length"),
    (all(w % widths[0] == 0 for w in widths), "block_out_channels are not multiples of the first"),
  ]
  for ok, why in checks:
    if not ok:
      raise ConfigError(f"{where}: {why}; autoencoder_kl cannot represent it")
  attend_down = [t == "AttnDownEncoderBlock2D" for t in down]
  attend_up = [t == "AttnUpDecoderBlock2D" for t in up][::-1]
  unknown = sorted(
    {t for t in down if t not in ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")}
    | {t for t in up if t not in ("UpDecoderBlock2D", "AttnUpDecoderBlock2D")}
  )
  if unknown or attend_down != attend_up:
    why = f"block type {unknown[0]}" if unknown else "attention at other levels up than down"
    raise ConfigError(f"{where}: {why}; autoencoder_kl cannot represent it")
  size = int(sample_size or get("sample_size") or 256)
  size = size[0] if isinstance(size, (list, tuple)) else size
  options = {
    "channels": widths[0],
    "channel_multipliers": tuple(w // widths[0] for w in widths),
    "num_res_blocks": int(get("layers_per_block", 1)),
    "attention_resolutions": tuple(size // 2**i for i, a in enumerate(attend_down) if a),
    "latent_channels": int(get("latent_channels", 4)),
    "use_quant_conv": bool(get("use_quant_conv", True)),
    "norm_groups": int(get("norm_num_groups", 32)),
  }
  scaling = {
    "scaling_factor": float(get("scaling_factor", 0.18215)),
    "shift_factor": None if get("shift_factor") is None else float(get("shift_factor")),
  }
  return options, (size, size, colors), scaling


def diffusers_config(options, image_shape, scaling, base=None):
  """diffusers' config.json for autoencoder_kl `options` at `image_shape`: `base` (the imported
  config, so fields flaxvae does not use survive) updated with the architecture and scaling."""
  widths = [int(options["channels"]) * int(m) for m in options["channel_multipliers"]]
  attend = [image_shape[0] // 2**i in options["attention_resolutions"] for i in range(len(widths))]
  cfg = dict(base or {})
  cfg.update(
    _class_name="AutoencoderKL",
    in_channels=int(image_shape[-1]),
    out_channels=int(image_shape[-1]),
    down_block_types=["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attend],
    up_block_types=["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in attend][::-1],
    block_out_channels=widths,
    layers_per_block=int(options["num_res_blocks"]),
    act_fn="silu",
    latent_channels=int(options["latent_channels"]),
    norm_num_groups=int(options["norm_groups"]),
    sample_size=int(image_shape[0]),
    use_quant_conv=bool(options["use_quant_conv"]),
    use_post_quant_conv=bool(options["use_quant_conv"]),
    mid_block_add_attention=True,
  )
  cfg.update({k: v for k, v in scaling.items() if v is not None or k == "shift_factor"})
  return cfg


# -- conversion ----------------------------------------------------------------------------------
def diffusers_to_params(state, like, source="the weights"):
  """Our pure params (numpy float32, the tree of `like`) from diffusers' state dict `state`.
  Every parameter must be there with its shape and no weight may be left over: otherwise a
  one-line ConfigError naming the first mismatching key and both shapes."""
  state = modern_attention_names(state)
  wanted = {diffusers_name(path): path for path in flatten(like)}
  shapes = {path: tuple(np.shape(leaf)) for path, leaf in flatten(like).items()}
  out = {}
  for name in sorted(set(wanted) | set(state)):
    if name not in wanted:
      raise ConfigError(
        f"{source}: weight {name} {_shape(state[name].shape)} has no place in this "
        "configuration (another architecture, or a config.json that does not match the weights)"
      )
    path = wanted[name]
    expected = torch_shape(path, shapes[path])
    if name not in state:
      raise ConfigError(
        f"{source}: no weight {name}, which this configuration needs with shape "
        f"{_shape(expected)}: the weights are not this configuration's"
      )
    value = np.asarray(state[name])
    if value.ndim == 4 and len(expected) == 2 and value.shape[2:] == (1, 1):
      value = value[:, :, 0, 0]  # attention stored as a 1x1 conv
    if tuple(value.shape) != expected:
      raise ConfigError(
        f"{source}: {name} has shape {_shape(value.shape)} but this configuration needs "
        f"{_shape(expected)}"
      )
    out[path] = to_flax_layout(path, value.astype(np.float32))
  return unflatten(out)


def params_to_diffusers(params):
  """diffusers' state dict {name: float32 array} of our pure params (the learned "logvar" of the
  loss is not an AutoencoderKL weight and is left out)."""
  return {
    diffusers_name(path): np.ascontiguousarray(to_torch_layout(path, np.asarray(leaf)))
    for path, leaf in flatten(params).items()
    if path[0] != "logvar"
  }


# -- files ---------------------------------------------------------------------------------------
def read_torch_checkpoint(path):
  """The state dict of a torch pickle (.ckpt/.pt/.bin; LDM's `state_dict` entry unwrapped):
  needs torch, imported only here."""
  try:
    import torch  # noqa: PLC0415
  except ImportError:
    raise ConfigError(
      f"{path} is a torch pickle, and reading it needs torch (pip install torch), or convert "
      "it to safetensors where torch is installed"
    ) from None
  loaded = torch.load(path, map_location="cpu", weights_only=True)
  loaded = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
  return {k: v.float().numpy() for k, v in loaded.items() if hasattr(v, "numpy")}


def read_source(source, norm_groups=None):
  """(diffusers state dict, diffusers config, kind) of SOURCE: a diffusers directory (config.json
  + diffusion_pytorch_model.safetensors, or a `vae/` subfolder of a pipeline), a .safetensors
  file (diffusers' or LDM's layout, config.json beside it if any) or a torch pickle of LDM's
  layout (.ckpt/.pt/.pth/.bin)."""
  if os.path.isdir(source):
    folder = os.path.join(source, "vae") if os.path.isdir(os.path.join(source, "vae")) else source
    path = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.exists(path):
      found = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
      if len(found) != 1:
        raise ConfigError(
          f"{folder} holds no {WEIGHTS_FILE} (and not exactly one .safetensors file): pass the "
          "weights file itself"
        )
      path = os.path.join(folder, found[0])
  elif os.path.isfile(source):
    path, folder = source, os.path.dirname(os.path.abspath(source))
  else:
    raise ConfigError(f"{source}: no such file or directory (a diffusers VAE or an LDM checkpoint)")
  raw = safetensors.read(path) if path.endswith(".safetensors") else read_torch_checkpoint(path)
  ldm = any(k.startswith(LDM_PREFIX) or k.startswith("encoder.down.") for k in raw)
  state = ldm_to_diffusers(raw) if ldm else modern_attention_names(raw)
  config_path = os.path.join(folder, CONFIG_FILE)
  if not ldm and os.path.exists(config_path):
    with open(config_path) as f:
      cfg = json.load(f)
    if norm_groups:
      cfg["norm_num_groups"] = norm_groups
    return state, cfg, "diffusers"
  cfg = infer_diffusers_config(state, norm_groups or 32)
  if cfg["latent_channels"] == 4:  # LDM's kl-f8 as Stable Diffusion 1.x uses it
    cfg["scaling_factor"] = KNOWN_SCALINGS["SD 1.x"][0]
  else:
    cfg["scaling_factor"] = 1.0
  return state, cfg, "ldm" if ldm else "diffusers"


def write_diffusers(dest, state, cfg):
  """diffusers' layout in directory `dest`: config.json + diffusion_pytorch_model.safetensors."""
  os.makedirs(dest, exist_ok=True)
  safetensors.write(os.path.join(dest, WEIGHTS_FILE), state, {"format": "pt"})
  with open(os.path.join(dest, CONFIG_FILE), "w") as f:
    json.dump(cfg, f, indent=2, sort_keys=True)
  return dest
