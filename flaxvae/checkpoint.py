"""Orbax checkpoints of a run: the train state, the data position and the resolved config.

A checkpoint is a plain Orbax composite under `workdir/checkpoints/<step>/` with
items `state` (a pytree: step, params, opt_state, ema_params, rng, skip counters),
`data` (JSON: the input pipeline's position) and `config` (JSON).
"""
import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Asynchronous saves every `every_steps`, keeping the last `max_to_keep`."""

  def __init__(self, workdir, checkpoint_config):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(max_to_keep=checkpoint_config.max_to_keep,
                                           enable_async_checkpointing=True, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step, state, data_state, config_dict):
    """Starts an asynchronous save of `state` (global jax arrays); returns at once."""
    self.manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config_dict)))

  def restore(self, step, abstract_state):
    """(state, data_state, config_dict) of `step`, laid out as `abstract_state` says."""
    restored = self.manager.restore(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore(),
        config=ocp.args.JsonRestore()))
    return restored["state"], restored["data"], restored["config"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree, sharding):
  """ShapeDtypeStructs of `tree` placed with `sharding`: the target of a restore."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
