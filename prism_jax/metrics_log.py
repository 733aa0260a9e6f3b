"""Run metrics to TensorBoard event files and a JSONL log (process 0 writes).

A run killed mid-write can leave a torn last line in metrics.jsonl: it is dropped (with a
note) before appending, and readers skip any line that does not parse.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
from tensorboardX import SummaryWriter

from prism_jax import layout


class MetricsLog:

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      path = layout.path(workdir, layout.METRICS)
      repair_torn_tail(path)
      self.writer = SummaryWriter(layout.path(workdir, layout.TENSORBOARD))
      self.jsonl = open(path, "a", encoding="utf-8")

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    scalars = {k: float(np.asarray(v)) for k, v in metrics.items() if np.ndim(v) == 0}
    for name, value in scalars.items():
      self.writer.add_scalar(name, value, step)
    self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self.jsonl.flush()

  def close(self):
    if self.enabled:
      self.writer.close()
      self.jsonl.close()


def _parses(line: bytes) -> bool:
  try:
    return isinstance(json.loads(line), dict)
  except ValueError:
    return False


def repair_torn_tail(path: str) -> None:
  """Truncates `path` after its last complete JSON line (a kill mid-write leaves half a one)."""
  if not os.path.isfile(path):
    return
  with open(path, "rb") as f:
    data = f.read()
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
    with open(path, "r+b") as f:
      f.truncate(keep)


def read_jsonl(path: str) -> list[dict]:
  """Every complete record; a torn or garbled line (a run killed mid-write) is skipped."""
  rows = []
  with open(path, encoding="utf-8", errors="replace") as f:
    for line in f:
      if line.strip():
        try:
          row = json.loads(line)
        except ValueError:
          continue
        if isinstance(row, dict):
          rows.append(row)
  return rows
