"""Run metrics to TensorBoard event files and a JSONL log (process 0 writes).

A run killed mid-write can leave a torn last line in metrics.jsonl: it is dropped (with a
note) before appending, and readers skip any line that does not parse. A bucket (gs://)
cannot append, so there the log is kept in memory and the file rewritten whole (write, then
rename) at each record: a few thousand short lines, so the rewrite is cheap next to a step.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
from etils import epath
from tensorboardX import SummaryWriter

from prism_jax import layout, outputs


class MetricsLog:
  """`resume_step`: the step the run restarts from. Records of later steps were written by
  an attempt that died before its next checkpoint; they are trained again, so they are
  dropped from metrics.jsonl and hidden from TensorBoard (its purge_step) rather than kept
  twice."""

  def __init__(self, workdir: str, resume_step: int | None = None):
    self.enabled = jax.process_index() == 0
    if self.enabled:
      epath.Path(workdir).mkdir(parents=True, exist_ok=True)
      path = layout.path(workdir, layout.METRICS)
      repair_torn_tail(path)
      purge_step = None
      if resume_step is not None:
        drop_records_after(path, resume_step)
        purge_step = resume_step + 1
      self.writer = SummaryWriter(layout.path(workdir, layout.TENSORBOARD),
                                  purge_step=purge_step)
      self.path = epath.Path(path)
      if outputs.is_local(self.path):
        self.jsonl, self.lines = self.path.open("a", encoding="utf-8"), None
      else:
        self.jsonl = None
        self.lines = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    scalars = {k: float(np.asarray(v)) for k, v in metrics.items() if np.ndim(v) == 0}
    for name, value in scalars.items():
      self.writer.add_scalar(name, value, step)
    line = json.dumps({"step": step, **scalars}) + "\n"
    if self.jsonl is not None:
      self.jsonl.write(line)
      self.jsonl.flush()
    else:
      self.lines.append(line)
      outputs.write_text(self.path, "".join(self.lines))

  def close(self):
    if self.enabled:
      self.writer.close()
      if self.jsonl is not None:
        self.jsonl.close()


def _parses(line: bytes) -> bool:
  try:
    return isinstance(json.loads(line), dict)
  except ValueError:
    return False


def repair_torn_tail(path: str) -> None:
  """Truncates `path` after its last complete JSON line (a kill mid-write leaves half a one)."""
  path = epath.Path(path)
  if not path.is_file():
    return
  data = path.read_bytes()
  keep = len(data)
  lines = data.split(b"\n")
  tail = lines[-1]  # text after the last newline: empty when the file ends cleanly
  if tail.strip():
    keep -= len(tail)
  elif len(lines) >= 2 and lines[-2].strip() and not _parses(lines[-2]):
    keep -= len(lines[-2]) + 1  # a last line that ends in a newline but is garbage
  if keep < len(data):
    print(f"note: dropped a torn last line ({len(data) - keep} bytes) of {path}",
          file=sys.stderr)
    # epath has no truncate (buckets cannot): rewrite whole, then rename, so a kill here
    # never loses the complete lines.
    tmp = path.parent / f".{path.name}.repair"
    tmp.write_bytes(data[:keep])
    tmp.replace(path)


def drop_records_after(path: str, step: int) -> None:
  """Rewrites `path` (whole, then a rename) without the records of steps after `step`."""
  path = epath.Path(path)
  if not path.is_file():
    return
  lines = path.read_bytes().splitlines(keepends=True)
  kept = [line for line in lines if not _step_after(line, step)]
  if len(kept) < len(lines):
    print(f"note: dropped {len(lines) - len(kept)} records after step {step} from {path} "
          "(logged after the last checkpoint; those steps run again)", file=sys.stderr)
    outputs.write_bytes(path, b"".join(kept))


def _step_after(line: bytes, step: int) -> bool:
  try:
    row = json.loads(line)
  except ValueError:
    return False  # readers skip it anyway
  return isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > step


def read_jsonl(path: str) -> list[dict]:
  """Every complete record; a torn or garbled line (a run killed mid-write) is skipped."""
  rows = []
  with epath.Path(path).open("rb") as f:
    for line in f:
      line = line.decode("utf-8", errors="replace")
      if line.strip():
        try:
          row = json.loads(line)
        except ValueError:
          continue
        if isinstance(row, dict):
          rows.append(row)
  return rows
