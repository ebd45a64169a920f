"""Where a latent autoencoder's decoder activations would leave float16's range.

Why: the SDXL VAE produces NaNs in float16 (diffusers #7188, #9844): activations in its
decoder's up blocks exceed float16's largest finite value, 65504, overflow to inf, and the
next GroupNorm turns inf into NaN. diffusers upcasts that VAE to float32 (force_upcast); the
sdxl-vae-fp16-fix weights were rescaled to stay in range. flaxvae computes in bfloat16 instead,
whose exponent range is float32's, with GroupNorm's statistics in float32
(models/autoencoder_kl.py): large activations stay finite, at bfloat16's 8-bit precision.

`decoder_activation_maxima(model, z)` runs the decoder stage by stage, as
AutoencoderKL.decode does, and returns the largest absolute value of the residual stream after
each stage (diffusers' names), so a user can see which stages of their weights would overflow
float16 before trusting a low-precision run. docs/interop.md gives the figures.
"""

import jax.numpy as jnp

FLOAT16_MAX = float(jnp.finfo(jnp.float16).max)


def decoder_activation_maxima(model, z):
  """{stage: max |activation|} (float32 scalars) for latents z through the decoder of an
  AutoencoderKL `model`, in its compute dtype; jittable."""
  largest = lambda h: jnp.max(jnp.abs(h.astype(jnp.float32)))
  maxima = {}
  h = z.astype(model.dtype)
  if model.post_quant_conv is not None:
    h = model.post_quant_conv(h)
  decoder = model.decoder
  h = decoder.conv_in(h)
  maxima["decoder.conv_in"] = largest(h)
  h = decoder.mid_block(h, False)
  maxima["decoder.mid_block"] = largest(h)
  for i, level in enumerate(decoder.up_blocks):
    for j, (resnet, attention) in enumerate(level.units()):
      h = resnet(h)
      if attention is not None:
        h = attention(h)
      maxima[f"decoder.up_blocks.{i}.resnets.{j}"] = largest(h)
    for upsampler in getattr(level, "upsamplers", ()):
      h = upsampler(h)
      maxima[f"decoder.up_blocks.{i}.upsamplers.0"] = largest(h)
  return maxima


def scale_up_block_branches(params, factor):
  """A copy of an AutoencoderKL's pure parameters with the residual branch of every ResNet in
  the decoder's up blocks (conv2's kernel and bias) multiplied by `factor`: random weights whose
  up-block activations reach a published VAE's ranges (the GroupNorm that starts each block
  undoes most of the scale, so the decoded image stays an image of the usual range)."""
  params = {**params, "decoder": {**params["decoder"]}}
  levels = {}
  for i, level in params["decoder"]["up_blocks"].items():
    resnets = {}
    for j, resnet in level["resnets"].items():
      conv2 = {name: value * factor for name, value in resnet["conv2"].items()}
      resnets[j] = {**resnet, "conv2": conv2}
    levels[i] = {**level, "resnets": resnets}
  params["decoder"]["up_blocks"] = levels
  return params
