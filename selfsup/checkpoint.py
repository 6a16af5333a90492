"""Orbax checkpoints of the whole train state plus the data iterator position.

A checkpoint is one step directory holding `state` (the train-state pytree, restored
with the shardings of the live state) and `data` (the grain iterator state as JSON).
Orbax writes into a temporary directory and renames it when complete, so the newest
*complete* checkpoint is always the one `latest_step()` returns; saves are asynchronous
and the last `keep` are kept.

Damage that happens after a save (a truncated array file, deleted metadata, an emptied
step folder) is met by `restore_newest` / `restore_state_newest`: they try the steps
newest first and return the first that restores, with the reason each newer one was
skipped. A full disk (or another OS error) while saving becomes `CheckpointWriteError`,
a one-line `UserError` that names the newest checkpoint still intact.
"""

import errno
import os
import shutil

import jax
import orbax.checkpoint as ocp

from selfsup.errors import UserError

# OS errors while writing that the user can fix (free space, quota, permissions).
_WRITE_ERRNOS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
                 errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                 errno.EPERM: "operation not permitted"}


class CheckpointWriteError(UserError):
  """A checkpoint could not be written; the older ones are intact."""


class Checkpointer:
  def __init__(self, directory: str, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                           enable_async_checkpointing=async_save,
                                           read_only=read_only,
                                           cleanup_tmp_directories=not read_only)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()})
    self._saving = None   # step of a save that may still be in flight

  def latest_step(self):
    return self.manager.latest_step()

  def steps(self) -> list[int]:
    """Every step directory orbax lists as complete, oldest first."""
    return sorted(self.manager.all_steps())

  # ---- saving ------------------------------------------------------------------------
  def save(self, step: int, state, data_state: dict, force: bool = False) -> None:
    self._check_pending()
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=force)
    except Exception as e:  # noqa: BLE001 - only OS write errors are turned into one line
      self._raise_write_error(step, e)
    self._saving = step

  def wait(self):
    self._check_pending()

  def _check_pending(self):
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      step, self._saving = self._saving, None
      self._raise_write_error(step, e)
    self._saving = None

  def _raise_write_error(self, step, e):
    cause = _os_write_error(e)
    if cause is None:
      raise e
    intact = [s for s in self._existing_steps() if step is None or s < step]
    kept = (f"the newest intact checkpoint is step {intact[-1]}" if intact else
            "no earlier checkpoint exists")
    raise CheckpointWriteError(
        f"could not write checkpoint step {step} in {self.directory}: {cause}; {kept}; "
        "free space (or fix the permissions) and rerun the same command to resume") from e

  def _existing_steps(self):
    try:
      self.manager.reload()
      return self.steps()
    except Exception:  # noqa: BLE001 - best effort, for the message only
      return sorted(int(d) for d in os.listdir(self.directory) if d.isdigit())

  # ---- restoring ---------------------------------------------------------------------
  def restore(self, step: int, abstract_state):
    """Restores into the structure/shardings of `abstract_state` (ShapeDtypeStructs)."""
    _check_step_folder(self.directory, step)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]

  def restore_newest(self, abstract_state, *, move_damaged: bool = True):
    """(step, state, data state, [(skipped step, reason)]) of the newest readable checkpoint.

    Newer checkpoints that fail to restore are skipped; with `move_damaged` they are
    moved (not deleted) to `<checkpoints>.damaged/STEP`, so training can write that step
    again. Returns step None when there is no checkpoint. If none restores, raises a
    UserError listing each step and why: then nothing is moved (a mismatch between the
    config and every checkpoint is not damage).
    """
    step, restored, skipped = self._newest_readable(
        lambda s: self.restore(s, abstract_state), "restored")
    if step is None:
      return None, None, None, []
    if move_damaged and skipped and jax.process_index() == 0:
      for bad, _ in skipped:
        self._move_aside(bad)
      self.manager.reload()
    state, data = restored
    return step, state, data, skipped

  def _newest_readable(self, read, verb: str):
    """(step, read(step), [(skipped step, reason)]) for the newest step `read` accepts.

    (None, None, []) without checkpoints; a UserError listing each step and why when
    every one fails.
    """
    skipped = []
    for step in reversed(self.steps()):
      try:
        return step, read(step), skipped
      except Exception as e:  # noqa: BLE001 - any failure to read a step is reported
        skipped.append((step, short_reason(e)))
    if skipped:
      raise UserError(f"no checkpoint in {self.directory} can be {verb}: "
                      + "; ".join(f"step {s}: {r}" for s, r in skipped))
    return None, None, []

  def _move_aside(self, step: int) -> str:
    target_dir = self.directory + ".damaged"
    os.makedirs(target_dir, exist_ok=True)
    target = os.path.join(target_dir, str(step))
    n = 1
    while os.path.exists(target):
      target = os.path.join(target_dir, f"{step}.{n}")
      n += 1
    shutil.move(os.path.join(self.directory, str(step)), target)
    return target

  def restore_state_only(self, step: int):
    """The train state onto this process's first device, whatever mesh saved it.

    The target comes from the checkpoint's own metadata, so evaluation needs neither the
    optimizer nor the topology of the training run (8 devices, FSDP, ...).
    """
    _check_step_folder(self.directory, step)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    metadata = self.manager.item_metadata(step)["state"]
    if metadata is None:
      raise ValueError("no metadata for the state item")
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          metadata)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))
    return restored["state"]

  def restore_state_newest(self):
    """(step, state, [(skipped step, reason)]) for evaluation; newest readable first."""
    return self._newest_readable(self.restore_state_only, "read")

  def close(self):
    self.manager.close()


def _check_step_folder(directory: str, step: int) -> None:
  """Cheap checks that give a clearer reason than orbax's errors for common damage."""
  folder = os.path.join(directory, str(step))
  if not os.path.isdir(folder):
    raise ValueError(f"no folder {folder}")
  if not os.listdir(folder):
    raise ValueError("the step folder is empty")
  for item in ("state", "data"):
    if not os.path.isdir(os.path.join(folder, item)):
      raise ValueError(f"the {item!r} item is missing")
  if not os.listdir(os.path.join(folder, "state")):
    raise ValueError("the 'state' item is empty")


def short_reason(e: Exception) -> str:
  """One short phrase for why a checkpoint could not be read."""
  text = " ".join(str(e).split()) or type(e).__name__
  if "TensorStore" in text or "reading array" in text:
    return "an array file is truncated or unreadable"
  return text if len(text) <= 160 else text[:157] + "..."


def _os_write_error(e: BaseException):
  """A short description if `e` (or what caused it) is an OS error the user can fix."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
      return f"{_WRITE_ERRNOS[e.errno]} ({e.strerror or e})"
    text = str(e)
    if "No space left on device" in text:
      return "disk full (No space left on device)"
    if "Disk quota exceeded" in text:
      return "disk quota exceeded"
    e = e.__cause__ or e.__context__
  return None


def abstract_like(tree):
  """ShapeDtypeStructs with shardings, to restore straight into the live layout."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)
