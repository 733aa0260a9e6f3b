"""Orbax checkpoints of the train state, the input pipeline's position and the model config.

Orbax writes each step to a temporary directory and renames it when complete, so a
half-written step is never listed; `latest_step` only sees finished ones. Every step also
carries the model settings that made it (`config` item), so a restore with other settings
is refused even when the run's config.json is gone.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import logging
import os

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from prism_jax.config import CheckpointConfig
from prism_jax.errors import UserError


class CheckpointMismatch(UserError):
  """The checkpoint is readable but is of another model: never a reason to skip it."""


class CheckpointDamaged(UserError):
  """The checkpoint's own bytes cannot be decoded (cut short, overwritten): `train` sets it
  aside and resumes from the one before; a tool that only reads names the other steps."""


class CheckpointUnreachable(UserError):
  """The checkpoint could not be read for a reason outside its bytes (permissions, I/O):
  stop and touch nothing, never set it aside."""


# Errors of access, not of content: the same bytes may read fine once access is restored.
_ACCESS_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO, errno.ENOSPC,
                  errno.ETIMEDOUT, errno.ENOTCONN, errno.EHOSTUNREACH, errno.ECONNREFUSED,
                  errno.EMFILE, errno.ENFILE, errno.ENOMEM}
_ACCESS_WORDS = ("PERMISSION_DENIED", "Permission denied", "UNAVAILABLE", "DEADLINE_EXCEEDED",
                 "UNAUTHENTICATED", "No space left on device", "RESOURCE_EXHAUSTED")


def access_error(e: BaseException) -> OSError | str | None:
  """The access failure (OSError or message) behind `e`, or None if `e` is about content."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _ACCESS_ERRNOS:
      return e
    text = str(e)
    if any(word in text for word in _ACCESS_WORDS):
      return text.strip().splitlines()[0]
    e = e.__cause__ or e.__context__
  return None


def model_settings(cfg) -> dict:
  """The settings that decide the parameters' shapes and meaning (model + prototypes)."""
  from prism_jax import config as config_lib  # the dataclass -> dict the run config uses

  full = config_lib.to_dict(cfg)
  return {section: full[section] for section in ("model", "prototypes")}


def settings_difference(saved: dict, current: dict) -> str | None:
  """`section.key=old, not new` for the first setting that differs; None when they agree."""
  for section, values in current.items():
    for key, value in values.items():
      old = saved.get(section, {}).get(key, value)
      same = old == value or (isinstance(value, (list, tuple)) and list(value) == old)
      if not same:
        return f"{section}.{key}={old!r}, not {value!r}"
  return None


def other_commit(recorded_ns: int | None, current_ns: int | None) -> bool:
  """Whether a record of some step was made on another checkpoint of that step than the one
  there now (a run deleted and trained again); a side that records no commit time cannot
  tell, and is taken to be the same."""
  return recorded_ns is not None and current_ns is not None and recorded_ns != current_ns


def saved_time(saved_ns: int) -> str:
  """A checkpoint's commit time (`Checkpointer.saved_ns`) as people read it, in UTC."""
  moment = datetime.datetime.fromtimestamp(saved_ns / 1e9, datetime.timezone.utc)
  return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


# How Orbax says the stored arrays do not have the shapes (or tree) the config asks for.
_SHAPE_MISMATCH = ("is not compatible with the stored shape", "tree structures do not match")


@contextlib.contextmanager
def _quiet_orbax(quiet: bool = True):
  """Orbax's absl warnings off (errors still shown) where they only describe what we asked."""
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  if quiet:
    absl_logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    absl_logger.setLevel(level)


class Checkpointer:
  """`save(step, state, data_iterator)` / `restore(step, abstract_state, data_iterator)`."""

  def __init__(self, directory: str, cfg: CheckpointConfig, *, read_only: bool = False,
               settings: dict | None = None):
    # epath keeps gs:// paths whole (os.path.abspath would turn them into local paths).
    self.directory = epath.Path(directory if "://" in str(directory)
                                else os.path.abspath(directory))
    self.settings = settings  # model settings saved with, and checked at, every step
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else cfg.keep, save_interval_steps=0 if read_only else 1,
        enable_async_checkpointing=cfg.async_save and not read_only,
        create=not read_only, read_only=read_only)
    # Orbax warns that a read-only directory is read-only; readers asked for exactly that.
    try:
      with _quiet_orbax(read_only):
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "config"))
    except OSError as e:
      raise UserError(f"cannot open checkpoints in {self.directory}: "
                      f"{e.strerror or e}") from None

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def saved_ns(self, step: int) -> int | None:
    """When Orbax committed `step` (its step metadata, ns since the epoch). Two checkpoints
    of one step (a run deleted and trained again) differ here; the index, compare's reused
    evaluations and the calibration report record it. None when the step records none."""
    try:
      with _quiet_orbax():  # it warns of each item it reads no metadata handler for
        value = self.manager.metadata(step).commit_timestamp_nsecs
    except Exception:  # noqa: BLE001 -- Orbax raises many types; no stamp is no check
      return None
    return int(value) if value else None

  def save(self, step: int, state, data_iterator=None, *, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    if self.settings is not None:
      items["config"] = ocp.args.JsonSave(self.settings)
    with self._saving(f"saving checkpoint step {step}"):
      return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  @contextlib.contextmanager
  def _saving(self, doing: str):
    """A save (or the wait for an async one) that fails for lack of disk or access is one
    line; the steps already committed stay as they were."""
    try:
      yield
    except Exception as e:  # noqa: BLE001 -- Orbax wraps I/O failures in many types
      access = access_error(e)
      if access is None:
        raise
      reason = access.strerror if isinstance(access, OSError) and access.strerror else access
      full = "No space left" in str(reason) or getattr(access, "errno", None) == errno.ENOSPC
      what = "disk full" if full else f"cannot write ({reason})"
      raise UserError(f"{what} while {doing} in {self.directory}; completed checkpoints "
                      f"are intact (latest: {self._committed()})") from e

  def _committed(self):
    try:
      self.manager.reload()
      return self.manager.latest_step()
    except Exception:  # noqa: BLE001 -- only for the message
      return "unknown"

  def check_settings(self, step: int) -> None:
    """Refuses a step made with other model settings (steps saved before this check: none)."""
    if self.settings is None or not (self.directory / str(step) / "config").exists():
      return
    try:
      saved = self.manager.restore(step, args=ocp.args.Composite(
          config=ocp.args.JsonRestore()))["config"]
    except Exception as e:  # noqa: BLE001 -- decoded below
      self._raise_unreadable(step, e)
    difference = settings_difference(saved, self.settings)
    if difference:
      raise CheckpointMismatch(
          f"checkpoint step {step} in {self.directory} was made with {difference}: use the "
          "settings the run was trained with (drop model.*/prototypes.* overrides) or another "
          "--workdir")

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restores into `abstract_state`'s shapes and shardings; the iterator in place."""
    self.check_settings(step)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001 -- Orbax/tensorstore raise many types for bad files
      self._raise_unreadable(step, e)
    return restored["state"]

  def restore_params(self, step: int, abstract_params):
    """The parameters alone, into `abstract_params`' shapes and shardings: Orbax's partial
    restore reads no optimizer moment (a third of the bytes of an AdamW state)."""
    self.check_settings(step)
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(
        sharding=a.sharding, global_shape=a.shape, dtype=a.dtype), abstract_params)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item={"params": abstract_params}, restore_args={"params": restore_args},
          partial_restore=True)))
    except Exception as e:  # noqa: BLE001 -- Orbax/tensorstore raise many types for bad files
      self._raise_unreadable(step, e)
    return restored["state"]["params"]

  def _raise_unreadable(self, step: int, e: Exception):
    """The one-line error for a failed restore: access, another model, or damaged bytes."""
    access = access_error(e)
    if access is not None:
      reason = access.strerror if isinstance(access, OSError) and access.strerror else access
      where = f" ({access.filename})" if getattr(access, "filename", None) else ""
      raise CheckpointUnreachable(
          f"cannot read checkpoint step {step} in {self.directory}: {reason}{where}; "
          "nothing was changed: fix access and run again") from e
    message = str(e).strip()
    first_line = message.splitlines()[0] if message else type(e).__name__
    first_line = first_line.split(" See full TensorStore details")[0]  # a dump of its spec
    if any(sign in message for sign in _SHAPE_MISMATCH):
      shapes = first_line.split(". ")[0] if "shape" in first_line else "parameter tree differs"
      raise CheckpointMismatch(f"checkpoint shapes differ from the config at step {step} in "
                               f"{self.directory} ({shapes}): restore with the model settings "
                               "the run was trained with (drop model.*/prototypes.* "
                               "overrides)") from e
    raise CheckpointDamaged(f"cannot restore checkpoint step {step} in {self.directory}: "
                            f"{first_line}") from e

  def set_aside(self, step: int) -> str:
    """Renames an unreadable step out of Orbax's view (kept for inspection, not deleted)."""
    source = self.directory / str(step)
    target = self.directory / f"{step}.unreadable"
    suffix = 1
    while target.exists():
      target, suffix = self.directory / f"{step}.unreadable{suffix}", suffix + 1
    if jax.process_index() == 0:
      source.rename(target)
    self.manager.reload()
    return str(target)

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
    with self._saving("finishing a checkpoint"):
      self.manager.wait_until_finished()

  def close(self):
    try:
      self.wait()
    finally:
      self.manager.close()


def abstract_with_sharding(abstract_state, shardings):
  """ShapeDtypeStructs carrying the target shardings, for sharded restore."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_state, shardings)
