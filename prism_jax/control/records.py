"""Controller and suppression files: small JSON records with a format tag, written atomically."""

from __future__ import annotations

import json
from typing import Any, Callable

from etils import epath

from prism_jax import outputs
from prism_jax.checkpoint import other_commit
from prism_jax.errors import UserError


def save(path: str, record: dict) -> str:
  return outputs.write_json(path, record)  # whole, then renamed: never half a file


def merged_report(path: str, report: dict) -> dict:
  """`report` plus the tasks of the report already at `path` that it does not recalibrate.

  controllers/report.json keeps each task's latest calibration, as controllers/<task>.json
  does: calibrating sciq after piqa keeps piqa's held-out figures (each task records its
  own step and checkpoint commit time). A task calibrated on an earlier checkpoint of the
  report's own step (the run was trained again) describes a model that is gone, and is
  dropped. An old report that cannot be read holds nothing to keep and is replaced.
  """
  try:
    old = json.loads(epath.Path(path).read_text(encoding="utf-8"))
  except (OSError, ValueError):  # none yet, or unreadable
    old = {}
  tasks = old.get("tasks") if isinstance(old, dict) else None
  kept = ({name: r for name, r in tasks.items()
           if name not in report["tasks"] and not _replaced_checkpoint(r, report)}
          if isinstance(tasks, dict) else {})
  return {**report, "tasks": {**kept, **report["tasks"]}}


def _replaced_checkpoint(task: Any, report: dict) -> bool:
  """Whether `task` was calibrated on another checkpoint of the step `report` describes."""
  if not isinstance(task, dict) or task.get("step") != report.get("step"):
    return False
  return other_commit(task.get("checkpoint_saved_ns"), report.get("checkpoint_saved_ns"))


def made_on(path: str) -> tuple:
  """(step, checkpoint_saved_ns) that the controller or suppression set at `path` records it
  was made on; (None, None) where it records none (or cannot be read: `load` says why)."""
  try:
    record = json.loads(epath.Path(path).read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return None, None
  if not isinstance(record, dict):
    return None, None
  return record.get("step"), record.get("checkpoint_saved_ns")


def other_checkpoint(made: tuple, step: int, saved_ns: int | None) -> str | None:
  """What a record `made` on (step, commit time) says against the checkpoint in use, or None
  when it is that checkpoint (or records nothing to tell)."""
  made_step, made_ns = made
  if made_step is None:
    return None
  if made_step != step:
    return f"checkpoint step {made_step}, not {step}: its prototypes have moved since"
  if other_commit(made_ns, saved_ns):
    return (f"another checkpoint of step {step} (a run trained again?): its prototype ids "
            "name other prototypes")
  return None


def load(path: str, fmt: str, what: str, how_to_make: str,
         parse: Callable[[dict], Any]) -> Any:
  """`parse(record)` for the record at `path`; UserError when missing, malformed or not `fmt`."""
  if epath.Path(path).is_dir():
    raise UserError(f"{path} is a folder, not a {what} file; {how_to_make}")
  if not epath.Path(path).is_file():
    raise UserError(f"no {what} at {path}; {how_to_make}")
  try:
    record = json.loads(epath.Path(path).read_text(encoding="utf-8"))
  except UnicodeDecodeError as e:
    raise UserError(f"{path} is not a {what} file: not UTF-8 text (byte {e.start})") from None
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read {what} {path}: {type(e).__name__}: {e}") from None
  if not isinstance(record, dict) or record.get("format") != fmt:
    raise UserError(f"{path} is not a {fmt} file")
  try:
    return parse(record)
  except (KeyError, TypeError, AttributeError, ValueError) as e:
    raise UserError(f"cannot read {what} {path}: {type(e).__name__}: {e}") from None
