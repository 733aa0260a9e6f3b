"""The one way tools write: atomic files, guarded folders, plain names, a lock per workdir.

  name = outputs.plain_name(args.name, "--name")          # no '/', '..', hidden names
  outputs.check_folder(out, "prototype index", is_index)  # before any work
  outputs.check_file_target(path, "--json", FORMAT)        # before any work
  outputs.write_json(path, record)                        # whole or not at all
  with outputs.WorkdirLock(workdir, "index"): ...         # one writer per run directory

Errors are one-line `UserError`s; a full disk says so. Paths go through `etils.epath`, so
the same calls write local folders and gs:// buckets.
"""

from __future__ import annotations

import datetime
import errno
import io
import json
import os
import re
import shutil
import socket
import sys
from typing import Callable

import numpy as np
from etils import epath

from prism_jax import layout
from prism_jax.errors import UserError

_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def plain_name(name: str, flag: str) -> str:
  """`name` if it is a plain file name (letters, digits, '.', '_', '-'; no path, not hidden)."""
  if not _PLAIN.fullmatch(name or "") or ".." in name:
    raise UserError(f"{flag} {name!r} is not a plain name: use letters, digits, '.', '_' or "
                    "'-' (at most 128, not starting with '.'), no '/' or '..'")
  return name


def os_error(e: OSError, doing: str) -> UserError:
  """One line for an OSError; a full disk is named as such."""
  if e.errno == errno.ENOSPC:
    return UserError(f"disk full while {doing}: free space and run again "
                     "(completed checkpoints and files are intact)")
  return UserError(f"{doing} failed: {e.strerror or e}")


def write_bytes(path, data: bytes) -> str:
  """Writes `data` to `path` whole: a temporary sibling, then a rename."""
  path = epath.Path(path)
  tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(data)
    tmp.replace(path)
  except OSError as e:
    _remove_quietly(tmp)
    raise os_error(e, f"writing {path}") from None
  return str(path)


def write_text(path, text: str) -> str:
  """Writes `text` to `path` whole: a temporary sibling, then a rename."""
  return write_bytes(path, text.encode("utf-8"))


def write_json(path, record) -> str:
  return write_text(path, json.dumps(record, indent=1))


def write_npz(path, arrays: dict) -> str:
  """numpy arrays as one .npz, whole (np.savez writes in place)."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  return write_bytes(path, buffer.getvalue())


def write_figure(path, fig, **savefig) -> str:
  """A matplotlib figure as a PNG, whole (matplotlib itself writes local files in place)."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", **savefig)
  return write_bytes(path, buffer.getvalue())


def unused_path(folder, stem: str, suffix: str) -> str:
  """folder/stem+suffix, or stem-2, stem-3, ... when taken: a new file never replaces one
  (two runs finishing within the same second, named by the time)."""
  folder = epath.Path(folder)
  path, n = folder / f"{stem}{suffix}", 1
  while path.exists():
    n += 1
    path = folder / f"{stem}-{n}{suffix}"
  return str(path)


def check_file_target(path, flag: str, fmt: str | None = None) -> None:
  """Refuses, before any work, a file path that cannot be written: an existing folder, or a
  local path under a file or under an unwritable folder. With `fmt`, a file already there is
  replaced only when it is a record of that format (this tool's earlier output): the path
  is the user's to type, and a run's config.json or their own notes must survive a typo."""
  if path is None:
    return
  path = epath.Path(path)
  if path.is_dir():
    raise UserError(f"{flag} {path} is a folder; give a file path")
  if fmt is not None and path.exists() and not is_record(path, fmt):
    raise UserError(f"{flag} {path} exists and is not a {fmt} file (nothing was written); "
                    "give a new path, or remove that file first")
  _check_can_create(path, flag)


def is_record(path, fmt: str) -> bool:
  """True when `path` holds a JSON object whose "format" is `fmt`."""
  try:
    record = json.loads(epath.Path(path).read_text(encoding="utf-8"))
  except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
    return False
  return isinstance(record, dict) and record.get("format") == fmt


def check_folder_target(path, flag: str) -> None:
  """Refuses, before any work, an output folder that cannot be written: an existing file, or
  a local path under a file or under an unwritable folder."""
  if path is None:
    return
  path = epath.Path(path)
  if path.exists() and not path.is_dir():
    raise UserError(f"{flag} {path} is a file, not a folder")
  _check_can_create(path, flag)


def _check_can_create(path: epath.Path, flag: str) -> None:
  if not is_local(path):
    return  # a bucket: its errors come from the write itself
  parent = path if path.is_dir() else path.parent
  while not parent.exists() and parent != parent.parent:
    parent = parent.parent
  if not parent.is_dir():
    raise UserError(f"{flag} {path}: {parent} is a file, not a folder")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise UserError(f"{flag} {path}: {parent} is not writable")


def _remove_quietly(path: epath.Path):
  try:
    if path.exists():
      path.unlink()
  except OSError:
    pass


def check_folder(path, kind: str, is_own: Callable[[epath.Path], bool], flag: str) -> None:
  """Refuses, before any work, to replace a folder that is not a `kind` (nor empty)."""
  path = epath.Path(path)
  if not path.exists():
    _check_can_create(path, flag)
    return
  if not path.is_dir():
    raise UserError(f"{flag} {path} is a file, not a {kind} folder")
  if any(path.iterdir()) and not is_own(path):
    raise UserError(f"{flag} {path} exists and is not a {kind} (nothing was changed); "
                    f"give a new or empty folder, or the {kind} to rebuild")


def replace_folder(tmp, target, kind: str, is_own: Callable[[epath.Path], bool],
                   flag: str) -> None:
  """Moves the finished `tmp` folder to `target`, replacing only a previous `kind` there."""
  target, tmp = epath.Path(target), epath.Path(tmp)
  check_folder(target, kind, is_own, flag)
  old = target.parent / f".{target.name}.old{os.getpid()}"
  try:
    if target.exists():
      target.rename(old)
    tmp.rename(target)  # a reader sees the old folder or the new one, never half of one
  except OSError as e:
    raise os_error(e, f"replacing {target}") from None
  if old.exists() and is_local(old):
    shutil.rmtree(old, ignore_errors=True)
  elif old.exists():
    old.rmtree()


def is_local(path) -> bool:
  """A path on this machine's filesystem (not a bucket such as gs://)."""
  return "://" not in str(path)


def absolute(path) -> str:
  """`path` made absolute for a record; a bucket path (gs://...) already is."""
  path = epath.Path(path)
  return str(path if not is_local(path) else path.absolute())


# ------------------------------------------------------------------------------------------
# One writer per workdir


def _process_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # someone else's live process
  return True


class WorkdirLock:
  """`workdir/writer.lock` names the process writing the run; a second writer is refused.

  A lock left by a process that is gone (kill -9, a crash) is taken over with a note. On a
  multi-process run only process 0 holds it (the others write through process 0 or into
  their own shards). Reentrant within a process (compare -> train share nothing, but a
  library call under an entry point that already holds the lock is fine).
  """

  FILE = layout.LOCK
  _held: dict[str, int] = {}

  def __init__(self, workdir, tool: str, *, create: bool = False, file: str | None = None,
               what: str | None = None):
    self.workdir = epath.Path(workdir)
    self.path = self.workdir / (file or self.FILE)  # `file`: another thing in that folder
    self.what = what or str(self.workdir)
    self.tool = tool
    self.create = create  # tools that read a run leave a missing workdir for their own error
    self.active = False

  def __enter__(self):
    import jax  # deferred: --help stays instant

    if jax.process_index() != 0:
      return self
    key = str(self.path)
    if key in self._held:
      self._held[key] += 1
      self.active = True
      return self
    if not self.create and not self.workdir.exists():
      return self  # nothing there to protect: the tool reports the missing run itself
    try:
      self.workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise os_error(e, f"creating the run directory {self.workdir}") from None
    record = {"tool": self.tool, "pid": os.getpid(), "host": socket.gethostname(),
              "since": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join(sys.argv)[:200]}
    for _ in range(3):
      if self._create(record):
        self._held[key] = 1
        self.active = True
        return self
      holder = self._holder()
      if holder == {}:
        continue  # released between our create and our read
      if holder is None or self._stale(holder):
        what = ("an unreadable lock" if holder is None else
                f"a stale lock of {holder.get('tool')} (pid {holder.get('pid')}, gone)")
        print(f"note: taking over {what} in {self.workdir}", file=sys.stderr)
        _remove_quietly(self.path)
        continue
      raise UserError(
          f"{self.what} is in use by {holder.get('tool')} (pid {holder.get('pid')} on "
          f"{holder.get('host')} since {holder.get('since')}); wait for it or stop it "
          f"(remove {self.path} only if that process is really gone)")
    raise UserError(f"cannot take the lock {self.path}: another writer keeps taking it")

  def _create(self, record) -> bool:
    text = json.dumps(record)
    try:
      if is_local(self.path):
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as f:
          f.write(text)
        return True
      if self.path.exists():  # object stores: best effort, no atomic create
        return False
      self.path.write_text(text)
      return True
    except FileExistsError:
      return False
    except OSError as e:
      raise os_error(e, f"taking the lock {self.path}") from None

  def _holder(self) -> dict | None:
    try:
      holder = json.loads(self.path.read_text())
      return holder if isinstance(holder, dict) else None
    except FileNotFoundError:
      return {}
    except (OSError, ValueError):
      return None

  def _stale(self, holder: dict) -> bool:
    pid = holder.get("pid")
    same_host = holder.get("host") == socket.gethostname()
    return same_host and isinstance(pid, int) and not _process_alive(pid)

  def __exit__(self, *exc):
    if not self.active:
      return
    key = str(self.path)
    self._held[key] -= 1
    if self._held[key] == 0:
      del self._held[key]
      _remove_quietly(self.path)
    self.active = False
