"""Ordinary mistakes and faults never lose or poison a run (the behaviours behind the refusals
of tests/test_bad_input.py): one writer per workdir, checkpoints set aside only when their
bytes are bad, no silent restart, no poisoned update kept, torn logs repaired, a full disk
named."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from prism_jax import comparison, outputs, restore
from prism_jax.attribution import index as index_lib
from prism_jax.checkpoint import model_settings
from prism_jax.errors import UserError, exit_on_user_error
from prism_jax.metrics_log import MetricsLog, read_jsonl
from prism_jax.models import lm
from prism_jax.step import TrainState, make_train_step
from prism_jax.training import train
from tests.synthetic import random_batch, synthetic_data, tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _steps(workdir):
  return sorted(p.name for p in (pathlib.Path(workdir) / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory):
  """A run with checkpoints at steps 1 and 2 (copied per test before it is damaged)."""
  cfg = tiny_config("train.steps=2", "checkpoint.every=1", "train.eval_every=100")
  workdir = tmp_path_factory.mktemp("run") / "run"
  train(cfg, str(workdir), synthetic_data(cfg))
  return cfg, workdir


def _copy(run, tmp_path):
  import shutil

  target = tmp_path / "copy"
  shutil.copytree(run, target)
  return str(target)


def test_a_run_past_train_steps_says_so_and_trains_nothing(two_step_run, tmp_path, capsys):
  _, run = two_step_run
  workdir = _copy(run, tmp_path)
  shorter = tiny_config("train.steps=1", "checkpoint.every=1", "train.eval_every=100")
  result = train(shorter, workdir, synthetic_data(shorter))
  assert result["step"] == 2 and not result["preempted"]
  assert ("the run is at step 2, at or past train.steps=1: nothing to train"
          in capsys.readouterr().out)
  assert _steps(workdir) == ["1", "2"]


@pytest.mark.parametrize("item", ["state", "config"])  # the arrays, or the settings check
def test_permission_error_stops_and_sets_nothing_aside(two_step_run, tmp_path, monkeypatch,
                                                       item):
  cfg, run = two_step_run
  workdir = _copy(run, tmp_path)
  before = _steps(workdir)

  restore = ocp.CheckpointManager.restore

  def denied(self, step, *a, args=None, **k):
    if args is None or item not in args.keys():
      return restore(self, step, *a, args=args, **k)
    # The arrays cannot be read, as Orbax reports it: an error caused by the OSError.
    raise ValueError("could not read array") from PermissionError(
        errno.EACCES, "Permission denied", f"{workdir}/checkpoints/{step}/state")

  monkeypatch.setattr(ocp.CheckpointManager, "restore", denied)
  with pytest.raises(UserError, match="Permission denied.*nothing was changed"):
    train(tiny_config("train.steps=4", "checkpoint.every=1"), workdir, synthetic_data(cfg))
  assert _steps(workdir) == before  # nothing renamed .unreadable, nothing deleted
  assert not (pathlib.Path(workdir) / outputs.WorkdirLock.FILE).exists()  # lock released


def test_all_checkpoints_unreadable_never_restarts_from_step_0(two_step_run, tmp_path, capsys):
  cfg, run = two_step_run
  workdir = _copy(run, tmp_path)
  for path in (pathlib.Path(workdir) / "checkpoints").rglob("*"):
    if path.is_file() and path.stat().st_size > 0 and "metadata" not in path.name:
      path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
  for _ in range(2):  # the second start finds only set-aside steps: still no silent restart
    with pytest.raises(UserError, match="no checkpoint .* could be restored"):
      train(tiny_config("train.steps=4"), workdir, synthetic_data(cfg))
  assert sorted(_steps(workdir)) == ["1.unreadable", "2.unreadable"]  # kept, not deleted
  assert "skipping unreadable checkpoint step 2" in capsys.readouterr().out


def test_a_tool_reading_a_damaged_latest_checkpoint_names_the_others(two_step_run, tmp_path):
  """Read-only tools set nothing aside (that is train's job): one line naming the damage,
  without TensorStore's dump of its spec, and the steps that can be passed instead."""
  cfg, run = two_step_run
  workdir = _copy(run, tmp_path)
  for path in (pathlib.Path(workdir) / "checkpoints" / "2" / "state").rglob("*"):
    if path.is_file() and path.parent.name == "d":  # the arrays' chunks
      path.write_bytes(path.read_bytes()[:100])
  with pytest.raises(UserError) as raised:
    restore.load_params(cfg, workdir)
  message = str(raised.value)
  assert message.startswith("cannot restore checkpoint step 2 in ")
  assert message.endswith("(the checkpoint is damaged; other steps here: 1: pass --step N, or "
                          "run train in this workdir, which sets a damaged step aside and "
                          "resumes from the one before)")
  assert "\n" not in message and "TensorStore details" not in message
  assert _steps(workdir) == ["1", "2"]
  assert restore.load_params(cfg, workdir, step=1)[2] == 1


def test_a_non_finite_update_is_never_kept():
  """Finite loss and gradient, NaN update (as a NaN learning rate gives): params unchanged."""
  cfg = tiny_config()
  graphdef, params = lm.init(cfg, 0)
  tx = optax.chain(optax.sgd(1e-3), optax.scale(float("nan")))
  zero = jax.numpy.zeros((), jax.numpy.int32)
  state = TrainState(step=zero, params=params, opt_state=tx.init(params), nonfinite_streak=zero,
                     nonfinite_total=zero)
  new, metrics = jax.jit(make_train_step(graphdef, cfg, tx))(state, random_batch(cfg))
  assert np.isfinite(float(metrics["loss/total"])) and np.isfinite(float(metrics["grad_norm"]))
  chex.assert_trees_all_equal(new.params, params)
  assert int(new.nonfinite_streak) == 1 and int(new.nonfinite_total) == 1


def test_two_writers_in_one_workdir(tmp_path, capsys):
  """A second train is refused while the first runs; after a kill -9 its lock is stale and
  the next start takes it over and resumes."""
  workdir = tmp_path / "run"
  env = dict(os.environ, PRISM_WORKER_HOLD="before_step:3",
             PRISM_WORKER_MARKER=str(tmp_path / "holding"))
  first = subprocess.Popen([sys.executable, "-m", "tests.train_worker", str(workdir), "6"],
                           cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 180
    while not (tmp_path / "holding").exists():
      assert first.poll() is None and time.time() < deadline, "worker never reached step 3"
      time.sleep(0.05)
    cfg = tiny_config("train.steps=6", "checkpoint.every=1", "train.eval_every=100")
    with pytest.raises(UserError, match=f"is in use by train \\(pid {first.pid} on"):
      train(cfg, str(workdir), synthetic_data(cfg))
    assert _steps(workdir) == ["1", "2"]  # the first writer's checkpoints are untouched
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  result = train(cfg, str(workdir), synthetic_data(cfg))
  captured = capsys.readouterr()
  assert f"taking over a stale lock of train (pid {first.pid}, gone)" in captured.err
  assert "resuming from step 2" in captured.out and result["step"] == 6


def test_lock_is_reentrant_and_released(tmp_path):
  with outputs.WorkdirLock(tmp_path, "index"):
    with outputs.WorkdirLock(tmp_path, "index"):  # a library call under the entry point
      assert (tmp_path / outputs.WorkdirLock.FILE).exists()
    assert (tmp_path / outputs.WorkdirLock.FILE).exists()
  assert not (tmp_path / outputs.WorkdirLock.FILE).exists()


def test_torn_metrics_line_is_repaired_and_skipped(tmp_path, capsys):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss/cross_entropy": 5.0, "tokens_per_second": 10.0}\n'
                  'garbage in the middle\n'
                  '{"step": 2, "loss/cross_entropy": 4.0, "tokens_per_second": 20.0}\n'
                  '{"step": 3, "loss/cross_en')  # killed mid-write
  assert [r["step"] for r in read_jsonl(path)] == [1, 2]  # readers skip what does not parse
  assert comparison.loss_curves(str(tmp_path))["train"] == [(1, 5.0), (2, 4.0)]
  log = MetricsLog(str(tmp_path))
  log.write(3, {"loss/cross_entropy": 3.0})
  log.close()
  assert "dropped a torn last line" in capsys.readouterr().err
  lines = path.read_text().splitlines()
  assert json.loads(lines[-1]) == {"step": 3, "loss/cross_entropy": 3.0}
  assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3]


def test_full_disk_while_saving_is_one_line_and_keeps_earlier_steps(two_step_run, tmp_path,
                                                                     monkeypatch):
  cfg, run = two_step_run
  workdir = _copy(run, tmp_path)

  def full(self, step, *a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(ocp.CheckpointManager, "save", full)
  with pytest.raises(UserError, match="disk full while saving checkpoint step 3 .* intact"):
    train(tiny_config("train.steps=3", "checkpoint.every=1", "train.eval_every=100"), workdir,
          synthetic_data(cfg))
  assert _steps(workdir) == ["1", "2"]


def test_os_errors_reaching_an_entry_point_are_one_line(capsys):
  @exit_on_user_error
  def main():
    raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/metrics.jsonl")

  with pytest.raises(SystemExit) as exit_info:
    main()
  assert exit_info.value.code == 2
  assert capsys.readouterr().err == "error: disk full: /runs/x/metrics.jsonl\n"


def test_checkpoints_carry_the_model_settings(two_step_run):
  cfg, run = two_step_run
  manager = ocp.CheckpointManager(run / "checkpoints", item_names=("config",),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  saved = manager.restore(2, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  manager.close()
  assert saved == json.loads(json.dumps(model_settings(cfg)))


def test_an_index_of_another_step_warns_only_when_allowed(tmp_path, capsys):
  cfg = tiny_config()
  (tmp_path / "manifest.json").write_text(json.dumps({
      "format": index_lib.FORMAT, "step": 7, "model_settings": model_settings(cfg),
      "shards": [{"start": 0, "stop": 32, "path": "shards/00000"}]}))
  with pytest.raises(UserError, match="built from checkpoint step 7, not 9"):
    index_lib.open_for(str(tmp_path), 9, model_settings(cfg))
  index_lib.open_for(str(tmp_path), 9, model_settings(cfg), allow_mismatch=True)
  assert "warning: the index" in capsys.readouterr().err
  other = model_settings(tiny_config("prototypes.top_k=2"))
  with pytest.raises(UserError, match="built with prototypes.top_k=4, not 2"):
    index_lib.open_for(str(tmp_path), 7, other)
  index_lib.open_for(str(tmp_path), 7, model_settings(cfg))  # its own step and settings


def test_an_index_of_an_earlier_checkpoint_of_the_same_step_is_refused(tmp_path, capsys):
  """A run deleted and trained again reaches the same step with other parameters: the
  checkpoint's commit time tells the two apart. An index or checkpoint that records none
  (built before the field existed) is judged by its step."""
  cfg = tiny_config()
  settings = model_settings(cfg)
  manifest = {"format": index_lib.FORMAT, "step": 7, "model_settings": settings,
              "checkpoint_saved_ns": 1_800_000_000_000_000_000,
              "shards": [{"start": 0, "stop": 32, "path": "shards/00000"}]}
  (tmp_path / "manifest.json").write_text(json.dumps(manifest))
  later = 1_800_000_100_000_000_000
  with pytest.raises(UserError, match=r"built from another checkpoint of step 7 \(committed "
                     r"2027-01-15 08:00:00 UTC; the one there now: 2027-01-15 08:01:40 UTC"):
    index_lib.open_for(str(tmp_path), 7, settings, saved_ns=later)
  index_lib.open_for(str(tmp_path), 7, settings, allow_mismatch=True, saved_ns=later)
  assert "another checkpoint of step 7" in capsys.readouterr().err
  index_lib.open_for(str(tmp_path), 7, settings, saved_ns=manifest["checkpoint_saved_ns"])
  index_lib.open_for(str(tmp_path), 7, settings, saved_ns=None)
  del manifest["checkpoint_saved_ns"]
  (tmp_path / "manifest.json").write_text(json.dumps(manifest))
  index_lib.open_for(str(tmp_path), 7, settings, saved_ns=later)


@pytest.mark.parametrize("name", ["../config", "a/b", ".hidden", "", "x" * 200, "a\0b"])
def test_plain_names_only(name):
  with pytest.raises(UserError, match="is not a plain name"):
    outputs.plain_name(name, "--name")


def test_a_file_named_by_the_time_never_replaces_another(tmp_path):
  """generate names its JSON by the second; two runs finishing in one second keep both."""
  first = outputs.write_json(outputs.unused_path(tmp_path / "g", "20261207-120000", ".json"),
                             {"run": 1})
  second = outputs.write_json(outputs.unused_path(tmp_path / "g", "20261207-120000", ".json"),
                              {"run": 2})
  third = outputs.unused_path(tmp_path / "g", "20261207-120000", ".json")
  assert [pathlib.Path(p).name for p in (first, second, third)] == [
      "20261207-120000.json", "20261207-120000-2.json", "20261207-120000-3.json"]
  assert json.loads(pathlib.Path(first).read_text()) == {"run": 1}


def test_replace_folder_never_replaces_a_foreign_folder(tmp_path):
  foreign = tmp_path / "run"
  foreign.mkdir()
  (foreign / "checkpoints").mkdir()
  new = tmp_path / "new.partial"
  new.mkdir()
  (new / "manifest.json").write_text(json.dumps({"format": index_lib.FORMAT}))
  with pytest.raises(UserError, match="exists and is not a prototype index"):
    outputs.replace_folder(new, foreign, "prototype index", index_lib.is_index, "--index")
  assert (foreign / "checkpoints").is_dir() and new.is_dir()
  old_index = tmp_path / "index"
  old_index.mkdir()
  (old_index / "manifest.json").write_text(json.dumps({"format": index_lib.FORMAT, "old": 1}))
  outputs.replace_folder(new, old_index, "prototype index", index_lib.is_index, "--index")
  assert "old" not in json.loads((old_index / "manifest.json").read_text())
  assert sorted(p.name for p in tmp_path.iterdir()) == ["index", "run"]
  # A damaged index (its manifest cut short) holding only an index's entries is rebuilt in
  # place; with anything else beside it, it is left alone.
  for entry in ("prototypes", "targets", "processes"):
    (old_index / entry).mkdir()
  (old_index / "manifest.json").write_text('{"format": "prism-ind')
  (old_index / "notes.txt").write_text("mine")
  new.mkdir()
  (new / "manifest.json").write_text(json.dumps({"format": index_lib.FORMAT, "new": 1}))
  with pytest.raises(UserError, match="exists and is not a prototype index"):
    outputs.replace_folder(new, old_index, "prototype index", index_lib.is_index, "--index")
  (old_index / "notes.txt").unlink()
  outputs.replace_folder(new, old_index, "prototype index", index_lib.is_index, "--index")
  assert "new" in json.loads((old_index / "manifest.json").read_text())


def test_make_clean_keeps_trained_runs(tmp_path):
  """`make clean` is for caches; it once removed runs/, every trained checkpoint with it."""
  repo = pathlib.Path(__file__).resolve().parents[1]
  for rel in ("runs/prism_tiny/checkpoints/60/x", "runs/bench/cache/row.json",
              "pkg/__pycache__/m.pyc", ".venv/lib/__pycache__/keep.pyc"):
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_text("x")
  subprocess.run(["make", "-f", str(repo / "Makefile"), "clean"], cwd=tmp_path, check=True,
                 capture_output=True)
  assert (tmp_path / "runs/prism_tiny/checkpoints/60/x").exists()
  assert (tmp_path / ".venv/lib/__pycache__/keep.pyc").exists()
  assert not (tmp_path / "runs/bench").exists() and not (tmp_path / "pkg/__pycache__").exists()


def test_compare_table_without_tasks_says_none_was_scored():
  from prism_jax.comparison import markdown_table
  run = {"head": "prism", "val_loss": 4.7, "bits_per_byte": 1.9, "perplexity": 110.0,
         "tasks": {}, "step_seconds": None}
  study = {"steps": 10, "tokens_per_step": 64, "seed": 1, "limit": 500,
           "runs": {"prism_x": run, "dense_x": {**run, "head": "dense"}}}
  table = markdown_table(study)
  assert "no downstream task scored" in table and "documents each" not in table


def test_a_start_that_never_saved_does_not_bind_the_workdir(tmp_path):
  """A first attempt that failed before its first checkpoint (here: a vocabulary the tokenizer
  could not build) left its config.json; the corrected command trains and replaces it."""
  workdir = tmp_path / "run"
  (workdir / "checkpoints").mkdir(parents=True)
  failed = tiny_config("model.vocab_size=10")
  (workdir / "config.json").write_text(json.dumps({"name": failed.name, "model": {
      "vocab_size": 10}}))
  cfg = tiny_config("train.steps=1", "train.eval_every=100")
  train(cfg, str(workdir), synthetic_data(cfg))
  assert json.loads((workdir / "config.json").read_text())["model"]["vocab_size"] == \
      cfg.model.vocab_size
  assert _steps(workdir) == ["1"]


def _tensorboard_steps(workdir, tag):
  from tensorboard.backend.event_processing import event_accumulator

  events = event_accumulator.EventAccumulator(str(pathlib.Path(workdir) / "tensorboard"))
  events.Reload()
  return [(e.step, e.value) for e in events.Scalars(tag)]


def test_resume_logs_each_step_once(tmp_path):
  """Steps logged after the last checkpoint by an attempt that then died are run again on
  resume: the log and TensorBoard keep each step once, as an uninterrupted run has them."""
  cfg = tiny_config("train.steps=6", "checkpoint.every=3", "train.log_every=1",
                    "train.eval_every=100")
  whole, cut = tmp_path / "whole", tmp_path / "cut"
  train(cfg, str(whole), synthetic_data(cfg))
  train(cfg, str(cut), synthetic_data(cfg))
  # The attempt died after logging step 6 and before its checkpoint was committed.
  import shutil

  shutil.rmtree(cut / "checkpoints" / "6")
  train(cfg, str(cut), synthetic_data(cfg))

  def losses(workdir):
    return [(r["step"], r["loss/cross_entropy"]) for r in read_jsonl(workdir / "metrics.jsonl")
            if "loss/cross_entropy" in r]

  assert [s for s, _ in losses(cut)] == [1, 2, 3, 4, 5, 6]
  assert losses(cut) == losses(whole)
  tag = "loss/cross_entropy"
  assert [s for s, _ in _tensorboard_steps(cut, tag)] == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([v for _, v in _tensorboard_steps(cut, tag)],
                             [v for _, v in _tensorboard_steps(whole, tag)], rtol=1e-6)


def test_a_damaged_index_is_one_line_naming_the_file(tmp_path):
  (tmp_path / "manifest.json").write_text(json.dumps({"format": index_lib.FORMAT}))
  part = tmp_path / "prototypes" / "00000"
  part.mkdir(parents=True)
  np.save(part / "posting_offsets.npy", np.arange(1000, dtype=np.int64))
  whole = (part / "posting_offsets.npy").read_bytes()
  (part / "posting_offsets.npy").write_bytes(whole[:100])  # a copy cut short: the header
  index = index_lib.Index(str(tmp_path))
  with pytest.raises(UserError, match=r"is damaged: prototypes/00000/posting_offsets.npy: "
                                      r"EOF: reading array header.*rebuild it \(make index\)"):
    index.array("prototypes/00000/posting_offsets.npy")
  (part / "posting_offsets.npy").write_bytes(whole[:len(whole) // 2])  # ... the data
  with pytest.raises(UserError, match="is damaged: prototypes/00000/posting_offsets.npy: "):
    index_lib.Index(str(tmp_path)).array("prototypes/00000/posting_offsets.npy")
  with pytest.raises(UserError, match="is damaged: prototypes/00001/posting_offsets.npy: "
                                      "No such file or directory"):
    index.array("prototypes/00001/posting_offsets.npy")
  (tmp_path / "manifest.json").write_text('{"format": "prism-ind')
  with pytest.raises(UserError, match=r"is damaged: manifest.json does not parse "
                                      r"\(JSONDecodeError: .*rebuild it \(make index\)"):
    index_lib.Index(str(tmp_path))
  assert index_lib.is_index(tmp_path)  # so that rebuilding it replaces it


def test_a_run_refuses_a_tokenizer_other_than_the_one_it_trained_with(tmp_path, monkeypatch):
  """Another sentencepiece model of the same size (a rebuilt data_cache, another
  data.tokenizer) maps the same ids to other pieces: resuming or reading the run with it
  is refused in one line; the one it trained with passes, as do tests' in-memory ones."""
  import dataclasses

  from prism_jax import layout, tokenizer_record
  from prism_jax.data.tokenizer import train_tokenizer
  from tests.test_data import _synthetic_texts
  from tests.text_model import CharTokenizer

  first, other = (train_tokenizer(_synthetic_texts(300, seed=seed), 400,
                                  str(tmp_path / f"t{seed}.model")) for seed in (1, 2))
  assert first.fingerprint != other.fingerprint
  cfg = tiny_config("train.steps=1", "train.eval_every=100")
  workdir = str(tmp_path / "run")
  train(cfg, workdir, dataclasses.replace(synthetic_data(cfg), tokenizer=first))
  recorded = json.loads((tmp_path / "run" / layout.TOKENIZER).read_text())
  assert recorded == {"path": first.path, "sha256": first.fingerprint}
  longer = tiny_config("train.steps=2", "train.eval_every=100")
  with pytest.raises(UserError, match=r"the tokenizer .*t2.model is not the one the run in "
                                      r".*run trained with \(.*t1.model, sha256 "):
    train(longer, workdir, dataclasses.replace(synthetic_data(longer), tokenizer=other))
  tokenizer_record.check(workdir, first)
  tokenizer_record.check(workdir, CharTokenizer())
  # an attempt that never saved binds nothing, as with config.json
  fresh = str(tmp_path / "fresh")
  tokenizer_record.record_or_check(fresh, other, resuming=False)
  train(cfg, fresh, dataclasses.replace(synthetic_data(cfg), tokenizer=first))
  assert json.loads((tmp_path / "fresh" / layout.TOKENIZER).read_text())["sha256"] == (
      first.fingerprint)
  assert train(longer, workdir, dataclasses.replace(synthetic_data(longer),
                                                    tokenizer=first))["step"] == 2
  # every tool reads its tokenizer and data through the Run, which checks the same way
  from prism_jax import data as data_lib
  from prism_jax.run import Run

  monkeypatch.setattr(data_lib, "prepare", lambda *a, **k: data_lib.DataBundle(
      tokenizer=other, train_source=[], validation_source=[]))
  run = Run(cfg=longer, workdir=workdir, mesh=None)
  for read in (run.tokenizer, run.data):
    with pytest.raises(UserError, match="is not the one the run in"):
      read()


def test_an_index_rebuilt_while_open_is_never_read_half_old_half_new(tmp_path):
  """A reader opens files as it first needs them; after `make index` swapped in a new
  build, those would be the new build's, paired with the old manifest."""
  def build(folder, offsets):
    (folder / "prototypes" / "00000").mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"format": index_lib.FORMAT}))
    for name in ("posting_offsets", "posting_token"):
      np.save(folder / "prototypes" / "00000" / f"{name}.npy", offsets)
    return folder

  target = build(tmp_path / "index", np.arange(4))
  os.utime(target / "manifest.json", (1.7e9, 1.7e9))  # built well before the rebuild
  index = index_lib.Index(str(target))
  np.testing.assert_array_equal(index.array("prototypes/00000/posting_offsets.npy"),
                                np.arange(4))
  outputs.replace_folder(build(tmp_path / "new", np.arange(9)), target, "prototype index",
                         index_lib.is_index, "--index")
  # what it read stays the old build's; a file it has not read yet is refused
  np.testing.assert_array_equal(index.array("prototypes/00000/posting_offsets.npy"),
                                np.arange(4))
  with pytest.raises(UserError, match="was rebuilt while it was open; open it again"):
    index.array("prototypes/00000/posting_token.npy")
  reopened = index_lib.Index(str(target))
  assert len(reopened.array("prototypes/00000/posting_token.npy")) == 9


def test_compare_resumed_scores_each_run_once(tmp_path, monkeypatch):
  """`make compare` end to end on the tiny pair: both runs trained and scored, the table,
  the JSON and the plot written; run again (as after an interruption) it trains nothing
  and evaluates nothing, and reports the same figures."""
  from prism_jax import evaluation
  from tests.text_model import CharTokenizer

  prism = tiny_config("train.steps=2", "train.eval_every=100", "checkpoint.every=2")
  dense = tiny_config("train.steps=2", "train.eval_every=100", "checkpoint.every=2",
                      exp="dense_tiny")
  kwargs = dict(train_data=synthetic_data, tokenizer=CharTokenizer(),
                validation=lambda cfg: synthetic_data(cfg).eval_batches(), progress=False)
  first = comparison.run_study(prism, dense, str(tmp_path), [], None, None, **kwargs)
  assert set(first["runs"]) == {prism.name, dense.name}
  for name, run in first["runs"].items():
    assert run["step"] == 2 and np.isfinite(run["val_loss"]) and run["step_seconds"] > 0
  for name in ("compare.md", "compare.json", "loss_curves.png"):
    assert (tmp_path / name).stat().st_size > 0
  assert json.loads((tmp_path / "compare.json").read_text())["runs"] == json.loads(
      json.dumps(first["runs"]))

  def no_second_evaluation(*args, **kwargs):
    raise AssertionError("evaluated again")

  monkeypatch.setattr(evaluation, "evaluate", no_second_evaluation)
  again = comparison.run_study(prism, dense, str(tmp_path), [], None, None, **kwargs)
  for name in first["runs"]:
    assert again["runs"][name]["val_loss"] == first["runs"][name]["val_loss"]
  # Other settings (here: a validation-batch count) are scored afresh.
  with pytest.raises(AssertionError, match="evaluated again"):
    comparison.run_study(prism, dense, str(tmp_path), [], None, 1, **kwargs)
  # So is a run deleted and trained again to the same step: another checkpoint (Orbax's
  # commit time), whose evaluation the first one's must never stand in for.
  from prism_jax import restore
  run_dir = str(tmp_path / dense.name)
  first_saved = restore.checkpoint_saved_ns(dense, run_dir, 2)
  import shutil
  shutil.rmtree(tmp_path / dense.name / "checkpoints")
  with pytest.raises(AssertionError, match="evaluated again"):
    comparison.run_study(prism, dense, str(tmp_path), [], None, None, **kwargs)
  assert first_saved is not None
  assert restore.checkpoint_saved_ns(dense, run_dir, 2) not in (None, first_saved)


def test_compare_stops_when_training_is_stopped(tmp_path, monkeypatch, capsys):
  """A SIGTERM or first Ctrl-C saves the run and returns early: compare must not go on to
  score a half-trained model (nor train its twin) as if it had finished."""
  import prism_jax.training
  from prism_jax import evaluation

  prism = tiny_config("train.steps=2")
  dense = tiny_config("train.steps=2", exp="dense_tiny")
  trained = []

  def stopped_train(cfg, workdir, data=None, mesh=None):
    trained.append(cfg.name)
    return {"preempted": True, "step": 1}

  def no_evaluation(*args, **kwargs):
    raise AssertionError("a stopped run was evaluated")

  monkeypatch.setattr(prism_jax.training, "train", stopped_train)
  monkeypatch.setattr(evaluation, "evaluate", no_evaluation)
  assert comparison.run_study(prism, dense, str(tmp_path), [], None, None) is None
  assert trained == [prism.name]
  assert f"== {prism.name}: stopped at step 1 of 2; run the same command again to resume" in (
      capsys.readouterr().out)
  assert not (tmp_path / "compare.json").exists() and not (tmp_path / "compare.md").exists()
