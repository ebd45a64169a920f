"""The one noise source: however the work is split (devices, microbatches, subsets of examples,
chunks of samples), every example gets the same draws."""

import jax
import jax.numpy as jnp
import numpy as np

from flaxvae.models.noise import NoiseSource

SHAPE = (4,)


def _per_device(key, local_batch, devices, num_samples=3):
  """Each of `devices` devices' per_global_batch source (vmapped over the batch axis)."""
  source = lambda: NoiseSource.per_global_batch(key, local_batch, num_samples, "data")
  return lambda use: jax.vmap(lambda _: use(source()), axis_name="data")(jnp.arange(devices))


def test_each_device_keeps_its_rows_of_one_global_draw():
  key = jax.random.key(0)
  whole = _per_device(key, 8, 1)(lambda noise: noise.normal(1, SHAPE))[0]  # [3, 8, 4]
  parts = _per_device(key, 2, 4)(lambda noise: noise.normal(1, SHAPE))  # [4, 3, 2, 4]
  np.testing.assert_array_equal(jnp.concatenate(list(parts), axis=1), whole)
  uniform = _per_device(key, 2, 4)(lambda noise: noise.uniform(SHAPE))
  np.testing.assert_array_equal(
    uniform.reshape(8, *SHAPE), _per_device(key, 8, 1)(lambda noise: noise.uniform(SHAPE))[0]
  )
  microbatch = _per_device(key, 8, 1)(lambda noise: noise.rows(2, 3).normal(1, SHAPE))[0]
  np.testing.assert_array_equal(microbatch, whole[:, 2:5])


def test_an_example_draws_the_same_whatever_else_is_evaluated_with_it():
  keys = jax.random.split(jax.random.key(1), 5)
  every = NoiseSource.per_example(keys, jnp.arange(6)).normal(2, SHAPE)  # [6, 5, 4]
  some = NoiseSource.per_example(keys[1:3], jnp.arange(4, 6)).normal(2, SHAPE)
  np.testing.assert_array_equal(some, every[4:6, 1:3])


def test_from_key_draws_every_layer_from_its_own_stream():
  key = jax.random.key(2)
  noise = NoiseSource.from_key(key, 3, num_samples=2)
  np.testing.assert_array_equal(
    noise.normal(1, SHAPE), jax.random.normal(jax.random.fold_in(key, 1), (2, 3, *SHAPE))
  )
  assert not np.array_equal(noise.normal(0, SHAPE), noise.normal(1, SHAPE))


# -- the exact draws: a changed stream offset or fold order changes every trained result -------
def test_per_global_batch_draws_layer_l_from_stream_1_plus_l_and_uniforms_from_stream_0():
  """Layer l: normal(fold_in(key, 1 + l), [k, global batch, *shape]), each device its rows;
  dynamic binarization: uniform(fold_in(key, 0), [global batch, *event])."""
  key, local_batch, devices, num_samples = jax.random.key(3), 2, 3, 2
  per_device = _per_device(key, local_batch, devices, num_samples)
  for layer in (0, 2):
    drawn = per_device(lambda noise, layer=layer: noise.normal(layer, SHAPE))
    expected = jax.random.normal(
      jax.random.fold_in(key, 1 + layer), (num_samples, local_batch * devices, *SHAPE)
    )
    for device in range(devices):
      rows = slice(device * local_batch, (device + 1) * local_batch)
      np.testing.assert_array_equal(drawn[device], expected[:, rows])
  uniform = per_device(lambda noise: noise.uniform(SHAPE))
  np.testing.assert_array_equal(
    uniform.reshape(local_batch * devices, *SHAPE),
    jax.random.uniform(jax.random.fold_in(key, 0), (local_batch * devices, *SHAPE)),
  )


def test_per_example_draws_sample_i_of_layer_l_from_its_example_key():
  """Sample i, layer 0: normal(fold_in(k, i)); layer l > 0: normal(fold_in(fold_in(k, i), l))."""
  keys = jax.random.split(jax.random.key(4), 3)
  index = jnp.array([0, 5])
  for layer in (0, 1, 3):
    drawn = NoiseSource.per_example(keys, index).normal(layer, SHAPE)  # [2, 3, 4]
    for n, i in enumerate(index):
      for b, example_key in enumerate(keys):
        sample_key = jax.random.fold_in(example_key, i)
        if layer:
          sample_key = jax.random.fold_in(sample_key, layer)
        np.testing.assert_array_equal(drawn[n, b], jax.random.normal(sample_key, SHAPE))


def test_from_key_draws_layer_l_from_fold_in_key_l():
  key = jax.random.key(5)
  noise = NoiseSource.from_key(key, 3, num_samples=2)
  for layer in (0, 2):
    np.testing.assert_array_equal(
      noise.normal(layer, SHAPE),
      jax.random.normal(jax.random.fold_in(key, layer), (2, 3, *SHAPE)),
    )
