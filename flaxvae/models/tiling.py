"""Tiled encoding and decoding: images larger than the device's memory allows, a tile at a time.

Why: a convolutional autoencoder's activations grow with the image (the kl-f8 decoder holds
128-512 channels at full and half resolution), so a 2048 px image does not fit where a 512 px
one does. Tiling runs the network on overlapping tiles, one after another inside one `lax.scan`
(the compiled program holds one tile's activations, whatever the number of tiles), and blends
the overlaps linearly, as diffusers' tiled_encode/tiled_decode do.

The result differs from untiled processing: each tile sees only its own receptive field, and
GroupNorm normalises with the statistics of the tile, not of the whole image. The blend hides
the seams; docs/interop.md reports how large the difference is.

Blending: along each axis a tile's weight rises linearly over the first `overlap` outputs
from its neighbour's side (not at the image's border), falls over its last `overlap`, and the
weights of all tiles covering a position are normalised to sum to 1 there. Tiles start every
`tile - overlap` inputs, the last one aligned to the image's end, so every tile has the same
shape (one compiled function).

  tiled(fn, x, tile, overlap)      fn [b, t, t, c] -> arrays [b, t*s, t*s, c'] (any pytree):
                                   s = 8 for a kl-f8 decoder, 1/8 for its encoder
  model_at_size(settings.model, likelihood, dtype, trained_shape, image_shape)
                                   the autoencoder's graphdef for images of another size (the
                                   same parameters: its crop and padding follow the image)
"""

import dataclasses
import fractions

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxvae import models
from flaxvae.errors import ConfigError


def tile_starts(size, tile, stride):
  """Where tiles of `tile` start along an axis of `size`: every `stride`, the last at the end."""
  if size <= tile:
    return [0]
  starts = list(range(0, size - tile, stride))
  return starts + [size - tile]


def blend_weights(starts, tile, ramp, size):
  """[len(starts), tile] weights of each tile's outputs along one axis of `size` outputs: a
  linear ramp of `ramp` outputs on each side that meets another tile, normalised so that the
  tiles covering a position sum to 1 there."""
  position = np.arange(tile) + 0.5
  weights = []
  for start in starts:
    w = np.ones(tile)
    if ramp > 0 and start > 0:
      w = np.minimum(w, position / ramp)
    if ramp > 0 and start + tile < size:
      w = np.minimum(w, (tile - position) / ramp)
    weights.append(w)
  weights = np.asarray(weights)
  total = np.zeros(size)
  for start, w in zip(starts, weights):
    total[start : start + tile] += w
  return np.stack([w / total[s : s + tile] for s, w in zip(starts, weights)])


@dataclasses.dataclass(frozen=True)
class Axis:
  """One spatial axis's tiling: tile starts in inputs and outputs and the blend weights."""

  tile: int
  starts: list
  out_tile: int
  out_starts: list
  weights: np.ndarray


def _axis(size, tile, overlap, scale, what):
  tile = min(tile, size)
  starts = tile_starts(size, tile, tile - overlap)
  scaled = [s * scale for s in (size, tile, overlap, *starts)]
  if any(v.denominator != 1 for v in scaled):
    raise ConfigError(
      f"tiling {what}: a side of {size} in tiles of {tile} overlapping by {overlap} puts tile "
      f"edges between outputs (the network scales by {scale}): use a tile, overlap and image "
      f"side that are multiples of {scale.denominator}"
    )
  out_size, out_tile, out_overlap, *out_starts = (int(v) for v in scaled)
  weights = blend_weights(out_starts, out_tile, out_overlap, out_size)
  return Axis(tile, starts, out_tile, out_starts, weights)


def tiled(fn, x, tile, overlap, what="images"):
  """fn applied to `x` [b, H, W, c] a tile of `tile` x `tile` inputs at a time (tiles overlap by
  `overlap` inputs, each side capped at the image's), the outputs blended linearly (module
  doc). fn returns an array or a pytree of arrays [b, t*s, t*s, c'], s the same for every
  leaf and both axes. Jittable; the tiles run one after another in a lax.scan."""
  if tile < 1 or not 0 <= overlap < tile:
    raise ConfigError(
      f"tiling {what}: the tile must be positive and the overlap in [0, tile), got tile "
      f"{tile} and overlap {overlap}"
    )
  b, height, width, channels = x.shape
  th, tw = min(tile, height), min(tile, width)
  out_shapes = jax.eval_shape(fn, jax.ShapeDtypeStruct((b, th, tw, channels), x.dtype))
  first = jax.tree.leaves(out_shapes)[0]
  scale = fractions.Fraction(first.shape[1], th)
  if fractions.Fraction(first.shape[2], tw) != scale:
    raise ConfigError(f"tiling {what}: the network scales height and width differently")
  rows = _axis(height, tile, overlap, scale, what)
  cols = _axis(width, tile, overlap, scale, what)
  grid = [(i, j) for i in range(len(rows.starts)) for j in range(len(cols.starts))]
  take = lambda values, axis: jnp.asarray(np.asarray([values[k[axis]] for k in grid]))
  xs = (
    take(rows.starts, 0),
    take(cols.starts, 1),
    take(rows.out_starts, 0),
    take(cols.out_starts, 1),
    take(rows.weights, 0).astype(jnp.float32),
    take(cols.weights, 1).astype(jnp.float32),
  )
  zero = jnp.int32(0)

  def body(total, tile_inputs):
    y, x0, out_y, out_x, row_weights, col_weights = tile_inputs
    piece = jax.lax.dynamic_slice(x, (zero, y, x0, zero), (b, rows.tile, cols.tile, channels))
    weight = (row_weights[:, None] * col_weights[None, :])[None, :, :, None]

    def add(acc, out):
      corner = (zero, out_y, out_x, zero)
      current = jax.lax.dynamic_slice(acc, corner, out.shape)
      return jax.lax.dynamic_update_slice(acc, current + out.astype(jnp.float32) * weight, corner)

    return jax.tree.map(add, total, fn(piece)), None

  totals = jax.tree.map(
    lambda s: jnp.zeros((b, int(height * scale), int(width * scale), s.shape[-1]), jnp.float32),
    out_shapes,
  )
  return jax.lax.scan(body, totals, xs)[0]


def downsampling_factor(model_settings):
  """The autoencoder's spatial downsampling (2 ** (levels - 1); 8 for kl-f8)."""
  return 2 ** (len(model_settings.kwargs().get("channel_multipliers", (1, 2, 4, 4))) - 1)


def model_at_size(model_settings, likelihood, dtype, trained_shape, image_shape):
  """The graphdef of the autoencoder `model_settings` (settings.ModelSettings) for images of
  `image_shape` (H, W, C), with the parameters of one trained on `trained_shape`: merge it with
  those (nnx.merge(graphdef, params)). The attention stays at the levels it was trained at
  (attention_resolutions count pixels of the trained image) and nothing is padded (pad_to
  pads a small training image to a multiple of the downsampling factor)."""
  options = model_settings.kwargs()
  trained = max(int(options.get("pad_to", 0)), int(trained_shape[0]))
  levels = len(options.get("channel_multipliers", (1, 2, 4, 4)))
  resolutions = {int(r) for r in options.get("attention_resolutions", ())}
  attended = [i for i in range(levels) if trained // 2**i in resolutions]
  options.update(
    pad_to=0, attention_resolutions=tuple(int(image_shape[0]) // 2**i for i in attended)
  )
  resized = dataclasses.replace(model_settings, options=tuple(options.items()))
  model = models.create_model(
    resized, image_shape=tuple(image_shape), likelihood=likelihood, dtype=dtype, abstract=True
  )
  return nnx.split(model)[0]
