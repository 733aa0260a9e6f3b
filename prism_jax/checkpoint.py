"""Orbax checkpoints of the train state and the input pipeline's position, in one step dir.

Orbax writes each step to a temporary directory and renames it when complete, so a
half-written step is never listed; `latest_step` only sees finished ones.
"""

from __future__ import annotations

import logging
import os

import grain
import jax
import orbax.checkpoint as ocp

from prism_jax.config import CheckpointConfig
from prism_jax.errors import UserError


class CheckpointMismatch(UserError):
  """The checkpoint is readable but is of another model: never a reason to skip it."""


# How Orbax says the stored arrays do not have the shapes (or tree) the config asks for.
_SHAPE_MISMATCH = ("is not compatible with the stored shape", "tree structures do not match")


class Checkpointer:
  """`save(step, state, data_iterator)` / `restore(step, abstract_state, data_iterator)`."""

  def __init__(self, directory: str, cfg: CheckpointConfig, *, read_only: bool = False):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else cfg.keep, save_interval_steps=0 if read_only else 1,
        enable_async_checkpointing=cfg.async_save and not read_only,
        create=not read_only, read_only=read_only)
    # Orbax warns that a read-only directory is read-only; readers asked for exactly that.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    if read_only:
      absl_logger.setLevel(logging.ERROR)
    try:
      self.manager = ocp.CheckpointManager(self.directory, options=options,
                                           item_names=("state", "data"))
    finally:
      absl_logger.setLevel(level)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_iterator=None, *, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restores into `abstract_state`'s shapes and shardings; the iterator in place."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001 -- Orbax/tensorstore raise many types for bad files
      message = str(e).strip()
      first_line = message.splitlines()[0] if message else type(e).__name__
      if any(sign in message for sign in _SHAPE_MISMATCH):
        shapes = first_line.split(". ")[0] if "shape" in first_line else "parameter tree differs"
        raise CheckpointMismatch(f"checkpoint shapes differ from the config at step {step} in "
                        f"{self.directory} ({shapes}): restore with the model settings the run "
                        "was trained with (drop model.*/prototypes.* overrides)") from e
      raise UserError(f"cannot restore checkpoint step {step} in {self.directory}: "
                      f"{first_line}") from e
    return restored["state"]

  def set_aside(self, step: int) -> str:
    """Renames an unreadable step out of Orbax's view (kept for inspection, not deleted)."""
    source = os.path.join(self.directory, str(step))
    target = f"{source}.unreadable"
    suffix = 1
    while os.path.exists(target):
      target, suffix = f"{source}.unreadable{suffix}", suffix + 1
    if jax.process_index() == 0:
      os.rename(source, target)
    self.manager.reload()
    return target

  def reached_preemption(self, step: int) -> bool:
    """JAX's preemption notice (multi-host runs with the coordination service)."""
    if jax.process_count() == 1:
      return False
    try:
      return self.manager.reached_preemption(step)
    except Exception:  # noqa: BLE001 -- no coordination service on single-process runs
      return False

  def wait(self):
    """Blocks until pending async saves are committed (and surfaces their errors)."""
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_sharding(abstract_state, shardings):
  """ShapeDtypeStructs carrying the target shardings, for sharded restore."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_state, shardings)
