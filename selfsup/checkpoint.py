"""Orbax checkpoints of the whole train state plus the data iterator position.

A checkpoint is one step directory holding `state` (the train-state pytree, restored
with the shardings of the live state) and `data` (the grain iterator state as JSON).
Orbax writes into a temporary directory and renames it when complete, so the newest
*complete* checkpoint is always the one `latest_step()` returns; saves are asynchronous
and the last `keep` are kept.
"""

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()})

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, force: bool = False) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=force)

  def restore(self, step: int, abstract_state):
    """Restores into the structure/shardings of `abstract_state` (ShapeDtypeStructs)."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]

  def restore_state_only(self, step: int):
    """The train state onto this process's first device, whatever mesh saved it.

    The target comes from the checkpoint's own metadata, so evaluation needs neither the
    optimizer nor the topology of the training run (8 devices, FSDP, ...).
    """
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    metadata = self.manager.item_metadata(step)["state"]
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          metadata)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))
    return restored["state"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def abstract_like(tree):
  """ShapeDtypeStructs with shardings, to restore straight into the live layout."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)
