"""The one noise source behind the contract's `Noise` (models/contract.py): standard-normal draws
for the posterior samples, [num_samples, batch, *shape] per latent layer.

Who draws decides how the draws are keyed, so that results do not depend on how the work is
split; one named constructor per way:
  per_global_batch  training: at step s every device draws the whole global batch's noise from
                    one key (fold_in(rng, s)) and keeps its own rows, so the same seed and
                    global batch give the same numbers on any device count; stream 0 holds the
                    uniform draws of dynamic binarization, layer l draws stream 1 + l
  per_example       evaluation: sample i of the example with key k draws layer 0 from
                    fold_in(k, i) and layer l > 0 from fold_in(fold_in(k, i), l), so any subset
                    of examples, any chunk of samples and any device count score the same
  from_key          images (sampling, reconstructions): layer l draws from fold_in(key, l)
"""

import jax
import jax.numpy as jnp


class NoiseSource:
  """Noise for the posterior samples; build it with a named constructor (module docstring)."""

  def __init__(
    self,
    num_samples,
    *,
    key=None,
    first_stream=0,
    first=None,
    num_rows=None,
    total_rows=None,
    example_keys=None,
    index=None,
  ):
    self.num_samples = num_samples
    # One key draws a block of `total_rows` rows, of which this source keeps `num_rows` from
    # `first` (all of them when first is None)...
    self.key, self.first_stream = key, first_stream
    self.first, self.num_rows, self.total_rows = first, num_rows, total_rows
    # ... or each example has its own key and the samples their indices.
    self.example_keys, self.index = example_keys, index

  @classmethod
  def per_global_batch(cls, key, local_batch, num_samples, axes):
    """This device's `local_batch` rows of the global batch over the mesh `axes`."""
    return cls(
      num_samples,
      key=key,
      first_stream=1,
      first=jax.lax.axis_index(axes) * local_batch,
      num_rows=local_batch,
      total_rows=local_batch * jax.lax.axis_size(axes),
    )

  @classmethod
  def per_example(cls, example_keys, index):
    """Samples `index` [n] of the examples whose keys are `example_keys` [batch]."""
    return cls(index.shape[0], example_keys=example_keys, index=index)

  @classmethod
  def from_key(cls, key, batch, num_samples=1):
    """`num_samples` samples of `batch` examples, every layer's noise drawn at once from `key`."""
    return cls(num_samples, key=key, num_rows=batch, total_rows=batch)

  def rows(self, start, size):
    """The noise of this source's rows [start, start + size) (a microbatch's): the same draws."""
    if self.first is None:
      raise ValueError("rows needs a source built by per_global_batch")
    return NoiseSource(
      self.num_samples,
      key=self.key,
      first_stream=self.first_stream,
      first=self.first + start,
      num_rows=size,
      total_rows=self.total_rows,
    )

  def normal(self, layer, shape):
    if self.index is not None:

      def draw(key, i):
        key = jax.random.fold_in(key, i)
        return jax.random.normal(key if layer == 0 else jax.random.fold_in(key, layer), shape)

      eps = jax.vmap(lambda k: jax.vmap(lambda i: draw(k, i))(self.index))(self.example_keys)
      return jnp.swapaxes(eps, 0, 1)  # [n, batch, *shape]
    key = jax.random.fold_in(self.key, self.first_stream + layer)
    return self._mine(jax.random.normal(key, (self.num_samples, self.total_rows, *shape)), 1)

  def uniform(self, event_shape):
    """Uniform draws [rows, *event_shape] from stream 0 (per_global_batch sources)."""
    if self.first_stream < 1:
      raise ValueError("uniform draws need a source built by per_global_batch")
    full = jax.random.uniform(jax.random.fold_in(self.key, 0), (self.total_rows, *event_shape))
    return self._mine(full, 0)

  def _mine(self, full, axis):
    """This source's rows of the whole block drawn on `axis`."""
    if self.first is None:
      return full
    return jax.lax.dynamic_slice_in_dim(full, self.first, self.num_rows, axis)
