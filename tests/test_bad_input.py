"""Every entry point answers every bad input a user can type with one line and exit code 2,
before any work and without writing a file.

The tables below are the contract: (entry point, arguments, what the message must say). Each
row runs the entry point's `main` in-process against a small trained run (the FACTS model of
tests/text_model.py) and checks that stderr is exactly one `error: ...` line containing the
text, and that no file under the run or the test's folder was created, changed or removed.
Rows for every number come from prism_jax/limits.py, so a new setting or flag gets its rows
by being added there (and tests/test_config.py fails if one is missing).
"""

from __future__ import annotations

import gzip
import importlib
import json
import os
import shutil
import socket

import pytest

from prism_jax import data as data_lib
from prism_jax import downstream, limits, restore
from prism_jax.attribution import index as index_lib
from prism_jax.checkpoint import model_settings
from prism_jax.control import controller as ctl, suppress as sup
from prism_jax.data import corpus
from tests.test_downstream import synthetic_docs, write_requests
from tests.text_model import FACTS, CharTokenizer, trained_text_model

RUN = "{run}"          # replaced by the trained run's workdir
MISSING = "{missing}"  # replaced by a workdir that does not exist
TMP = "{tmp}"          # replaced by the test's folder of prepared bad files
LONG_PROMPT = "a cat is red. " * 10  # 140 characters: past the run's 64-token context

# Inputs every entry point with --exp/--workdir/key=value shares.
COMMON = [
    ("unknown experiment", ["--exp", "prism_tiyn"],
     "unknown experiment 'prism_tiyn' (did you mean 'prism_tiny'?)"),
    ("unknown key", ["train.stepz=3"], "unknown config key 'train.stepz' (did you mean"),
    ("wrong value type", ["train.steps=ten"], "train.steps='ten' is not a valid int"),
    ("non-finite float", ["optimizer.learning_rate=nan"],
     "optimizer.learning_rate='nan' is not a finite number"),
    ("workdir that is a file", ["--workdir", f"{TMP}/a_file"], "is a file, not a run directory"),
]
# ... and every entry point that reads a checkpoint.
CHECKPOINT = [
    ("missing workdir", ["--workdir", MISSING], "no checkpoints in"),
    ("missing checkpoint step", ["--step", "7"], "no checkpoint for step 7"),
    ("mismatched checkpoint", ["model.d_model=64"], "was made with model.d_model=32, not 64"),
    ("checkpoint of other settings, config.json gone", ["--workdir", f"{TMP}/no_config"],
     "was made with model.vocab_size=128, not 8192"),
    ("config.json broken by hand", ["--workdir", f"{TMP}/broken_config"], "is not valid JSON"),
    ("config.json replaced by another record", ["--workdir", f"{TMP}/foreign_config"],
     "is not a run's config (a JSON object naming its experiment); fix it, or remove it"),
]
# ... and every entry point that reads the run's prototype index.
INDEX = [
    ("index of another checkpoint step", ["--index", f"{TMP}/old_index"],
     "was built from checkpoint step 7, not 150"),
]
# ... and every entry point that applies saved interventions.
INTERVENTIONS = [
    ("missing controller", ["--controller", "/nonexistent/c.json"], "no controller at"),
    ("controller with a non-finite gain", ["--controller", f"{TMP}/nan_gain.json"],
     "gain and bias must be finite numbers"),
    ("missing suppression set", ["--suppress", "/nonexistent/s.json"], "no suppression set at"),
    ("suppression ids given as a string", ["--suppress", f"{TMP}/string_ids.json"],
     "'prototypes' must be a list of integer prototype ids"),
    ("suppression of every prototype", ["--suppress", f"{TMP}/every_id.json"],
     "leaving 0, fewer than prototypes.top_k=4"),
    ("controller that is a folder", ["--controller", TMP], "is a folder, not a controller file"),
    ("controller that is a JSON list", ["--controller", f"{TMP}/list.json"],
     "list.json is not a prism-controller/1 file"),
    ("suppression set that is binary", ["--suppress", f"{TMP}/latin1.txt"],
     "latin1.txt is not a suppression set file: not UTF-8 text (byte"),
]

ENTRY_POINTS = {
    # name: (module, leading arguments, extra rows)
    "train": ("prism_jax.main.train", [], [
        ("workdir of another model", ["--workdir", RUN, "model.d_model=64"],
         "holds a run with model."),
        ("checkpoints of other settings, config.json gone", ["--workdir", f"{TMP}/no_config"],
         "was made with model.vocab_size=128, not 8192"),
        ("config.json broken by hand", ["--workdir", f"{TMP}/broken_config"],
         "is not valid JSON"),
        ("workdir held by another writer", ["--workdir", f"{TMP}/locked"],
         "is in use by train (pid 1"),
        ("head blocks that do not divide the length", ["prototypes.score_blocks=3"],
         "prototypes.score_blocks=3 does not divide data.seq_len=128"),
        ("head blocks that are not a whole number", ["prototypes.score_blocks=2.5"],
         "prototypes.score_blocks='2.5' is not a valid int"),
        ("mix route that is not a choice", ["prototypes.mix=sparse"],
         "prototypes.mix='sparse' is not one of ['auto', 'gather', 'dense']"),
        ("tied-init flag that is not a boolean", ["prototypes.tie_init=maybe"],
         "prototypes.tie_init='maybe' is not a boolean (use true/false)"),
        ("balance-on-keys flag that is not a boolean", ["losses.balance_keys_only=2"],
         "losses.balance_keys_only='2' is not a boolean (use true/false)"),
        ("coordinator that is no address", ["distributed.coordinator_address=nohost"],
         "is not HOST:PORT"),
        ("workdir that is an index", ["--workdir", f"{TMP}/old_index"],
         "old_index is a prototype index, not a run directory"),
        ("workdir that cannot be created", ["--workdir", "/proc/prism_run"],
         "creating the run directory /proc/prism_run failed: No such file or directory"),
    ]),
    "evaluate": ("prism_jax.main.evaluate", ["--tasks", "none"], CHECKPOINT + INTERVENTIONS + [
        ("unknown task", ["--tasks", "piqaa"], "unknown task 'piqaa' (did you mean 'piqa'?)"),
        ("missing text file", ["--text-file", "/nonexistent/x.txt"], "does not exist"),
        ("text file that is a folder", ["--text-file", TMP], "is a folder; give one UTF-8 text"),
        ("non-UTF-8 text file", ["--text-file", f"{TMP}/latin1.txt"], "is not UTF-8 text"),
        ("task data folder that does not exist", ["--tasks", "piqa", "--task-data",
                                                  "/nonexistent/tasks"],
         "--task-data /nonexistent/tasks: no such folder"),
        ("task data folder without the task", ["--tasks", "boolq", "--task-data", TMP],
         "no boolq request file (boolq/rc_0shot/requests.jsonl.gz)"),
        ("run whose results folder is a file", ["--workdir", f"{TMP}/eval_is_a_file"],
         "eval_is_a_file/eval is a file, not a folder"),
        ("validation split other than the run's", ["data.validation_fraction=0.2"],
         "was trained with 0.05, and another split would score documents it trained on"),
    ]),
    "generate": ("prism_jax.main.generate", ["--prompt", "a cat is"],
                 CHECKPOINT + INTERVENTIONS + [
        ("prompt longer than the context", ["--prompt", LONG_PROMPT], "context"),
        ("prompt that is not UTF-8", ["--prompt", "ab\udcffcd"],
         "argument --prompt: is not UTF-8 text (byte 0xff at character 2)"),
        ("output that is a folder", ["--output", TMP], "is a folder; give a file path"),
        ("output that is the run's config", ["--output", f"{RUN}/config.json"],
         "config.json exists and is not a prism-generation/1 file (nothing was written)"),
        ("output under a file", ["--output", f"{TMP}/a_file/g.json"],
         "a_file is a file, not a folder"),
    ]),
    "index": ("prism_jax.main.index", [], CHECKPOINT + [
        ("unknown attribution key", ["attr.dampin=1"], "unknown attribution key 'attr.dampin'"),
        ("curvature that is not a choice", ["attr.curvature=diag"],
         "attr.curvature='diag' is not one of ['none', 'blocks', 'shared']"),
        ("keep-build-fields flag that is not a boolean", ["attr.index_keep_build_fields=maybe"],
         "attr.index_keep_build_fields='maybe' is not a boolean (use true/false)"),
        ("index dtype that is not a choice", ["attr.index_dtype=int8"],
         "attr.index_dtype='int8' is not one of ['float16', 'float32']"),
        ("index folder that is the run", ["--index", RUN], "exists and is not a prototype index"),
        ("index folder that is a file", ["--index", f"{TMP}/a_file"], "is a file, not a"),
        ("index folder under a file", ["--index", f"{TMP}/a_file/index"],
         "a_file is a file, not a folder"),
        ("workdir held by another writer", ["--workdir", f"{TMP}/locked"],
         "is in use by train (pid 1"),
        ("index being built by another run", ["--index", f"{TMP}/shared_index"],
         "shared_index is in use by index (pid 1"),
    ]),
    "attribute": ("prism_jax.main.attribute", ["--prompt", "a cat is"], CHECKPOINT + INDEX + [
        ("prompt longer than the context", ["--prompt", LONG_PROMPT], "context"),
        # A command line's bytes that are not UTF-8 reach Python as lone surrogates.
        ("target token that is not UTF-8", ["--target-token", "\udcfe"],
         "argument --target-token: is not UTF-8 text (byte 0xfe at character 0)"),
        ("missing index", [], "no prototype index"),
        ("json path that is a folder", ["--json", TMP], "is a folder; give a file path"),
        ("json path that is the run's config", ["--json", f"{RUN}/config.json"],
         "config.json exists and is not a prism-attribution/1 file (nothing was written)"),
        ("single_pass terms that are not a choice", ["attr.single_pass_terms=all"],
         "attr.single_pass_terms='all' is not one of ['unembedding', 'values', 'both']"),
        ("negative context sharpness", ["attr.context_sharpness=-1"],
         "attr.context_sharpness=-1 must be in [0, 64]"),
        ("values term on an index without curvature",
         ["attr.single_pass_terms=values", "--index", f"{TMP}/lean_index"],
         "was built with attr.curvature=none"),
    ]),
    "control calibrate": ("prism_jax.main.control", ["calibrate", "--task", "piqa",
                                                         "--task-data", TMP], CHECKPOINT + [
        ("unknown task", ["--task", "piqaa"], "unknown task 'piqaa' (did you mean 'piqa'?)"),
        ("task data that is a file", ["--task-data", f"{TMP}/a_file"], "a_file: not a folder"),
        ("too few documents to hold any out", ["--limit", "2"],
         "piqa: 2 documents at --calibration-fraction 0.5 give 1 to calibrate on and 1 to hold"),
        ("calibration fraction that leaves none out", ["--calibration-fraction", "0.999"],
         "piqa: 4 documents at --calibration-fraction 0.999 give 4 to calibrate on and 0 to"),
    ]),
    "control suppress": ("prism_jax.main.control", ["suppress", "--prototypes", "1",
                                                        "--words", "red"],
                         CHECKPOINT + INDEX + [
        ("unknown prototype id", ["--prototypes", "999"], "prototype 999 does not exist"),
        ("words that are not UTF-8", ["--words", "a\udcc3"],
         "argument --words: is not UTF-8 text (byte 0xc3 at character 1)"),
        ("name that is a path", ["--name", "../config"], "--name '../config' is not a plain name"),
        ("hidden name", ["--name", ".x"], "is not a plain name"),
        ("suppressing every prototype", ["--prototypes", *map(str, range(32))],
         "leaving 0, fewer than prototypes.top_k=4"),
    ]),
    "explore": ("prism_jax.main.explore", ["--no-progress"], CHECKPOINT + INDEX + [
        ("prompt longer than the context", ["--prompt", LONG_PROMPT], "context"),
        ("output folder that is a file", ["--output", f"{TMP}/a_file"],
         "a_file is a file, not a folder"),
        ("output folder holding a page of the report's name", ["--output", f"{TMP}/site"],
         "site holds report.html, not written by the explorer (nothing was written)"),
        ("workdir held by another writer", ["--workdir", f"{TMP}/locked"],
         "is in use by train (pid 1"),
    ]),
    "data": ("prism_jax.main.data", ["--data-dir", f"{TMP}/cache", "--bench-batches", "0"], [
        ("source folder without the corpus", ["--source-dir", f"{TMP}/nothing"], "lacks"),
        ("empty corpus", ["--source-dir", f"{TMP}/empty"], "the corpus is empty"),
        ("non-UTF-8 corpus", ["--source-dir", f"{TMP}/latin1"], "is not UTF-8 text"),
    ]),
    "plan": ("prism_jax.main.plan", ["--topology", "v5p-64"], [
        ("unknown topology", ["--topology", "tpu-8"], "tpu-8"),
        ("mesh that does not divide", ["mesh.model=3"], "mesh"),
        ("device count too large to plan", ["--topology", "99999999999"],
         "--topology 99999999999: a device count must be in [1, 131072]"),
        ("slice size that does not exist", ["--topology", "v5p-99999999"],
         "is not a v5p slice size"),
        ("unknown step to compile", ["--steps", "train,bogus"], "unknown step 'bogus'"),
    ]),
    "lds": ("prism_jax.main.lds", [], [
        ("unknown method", ["--methods", "prototype,bogus"], "unknown method 'bogus'"),
        ("no method", ["--methods", " , "], "no method given; choose from single_pass"),
        ("attribution setting out of range", ["attr.lds_fraction=2"],
         "attr.lds_fraction=2 must be in (0, 1)"),
        ("workdir held by another writer", ["--workdir", f"{TMP}/locked"],
         "is in use by train (pid 1"),
    ]),
    "compare": ("prism_jax.main.compare", [], [
        ("unknown experiment", ["--prism", "prism_tiyn"], "unknown experiment 'prism_tiyn'"),
        ("runs that are not matched", ["--prism", "prism_tiny", "--dense", "prism_small"],
         "are not matched: they differ in"),
        ("workdir held by another writer", ["--workdir", f"{TMP}/locked", "--tasks", "none",
                                            "train.steps=1"],
         "is in use by train (pid 1"),
    ]),
}
# Entry points without --workdir of a trained run take only some of the common rows.
COMMON_ROWS = {
    "data": COMMON[:4],
    "plan": [("unknown experiment", ["--exp", "prism_tiyn"], "unknown experiment")] + COMMON[1:4],
    "lds": [], "compare": [],
}


def _number_rows():
  """A row for every value just outside the range of every numeric setting and flag."""
  for key, valid in limits.CONFIG_RANGES.items():
    entry = "index" if key.startswith("attr.") else "train"
    for value in valid.outside():
      message = (f"{key}='nan' is not a finite number" if value != value
                 else f"{key}={limits._fmt(value)} must be {valid.describe()}")
      yield entry, (f"out of range: {key}={value}", [f"{key}={value}"], message)
  for flag, (valid, entries) in limits.FLAG_RANGES.items():
    for entry in entries:
      for value in valid.outside():
        yield entry, (f"out of range: {flag} {value}", [flag, str(value)],
                      f"argument {flag}: must be {valid.describe()}")


def _rows():
  for entry, (module, lead, extra) in ENTRY_POINTS.items():
    for row in COMMON_ROWS.get(entry, COMMON) + extra:
      yield entry, row
  yield from _number_rows()


def _cases():
  for entry, (what, argv, message) in _rows():
    module, lead, _ = ENTRY_POINTS[entry]
    yield pytest.param(entry, module, lead, argv, message, id=f"{entry}: {what}")


def _latin1_sources(folder):
  folder.mkdir()
  for name, _ in corpus.SOURCES.values():
    with gzip.open(folder / name, "wb") as f:
      f.write(b"caf\xe9 au lait\n")


def _empty_sources(folder):
  folder.mkdir()
  for name, _ in corpus.SOURCES.values():
    with gzip.open(folder / name, "wb"):
      pass


def _bad_files(tmp, run, cfg):
  """The files the rows point at: each is wrong in exactly one way."""
  (tmp / "a_file").write_text("not a folder")
  (tmp / "latin1.txt").write_bytes(b"caf\xe9 au lait\n")
  write_requests(tmp, downstream.TASKS["piqa"], synthetic_docs(downstream.TASKS["piqa"], 4))
  (tmp / "nothing").mkdir()
  _empty_sources(tmp / "empty")
  _latin1_sources(tmp / "latin1")
  shutil.copytree(run, tmp / "no_config")
  (tmp / "no_config" / "config.json").unlink()
  shutil.copytree(run, tmp / "eval_is_a_file", ignore=shutil.ignore_patterns("eval"))
  (tmp / "eval_is_a_file" / "eval").write_text("not a folder")
  shutil.copytree(run, tmp / "foreign_config")
  (tmp / "foreign_config" / "config.json").write_text('{"method": "single_pass"}')
  shutil.copytree(run, tmp / "broken_config")
  (tmp / "broken_config" / "config.json").write_text('{"name": "prism_tiny", "model": {')
  (tmp / "locked").mkdir()
  (tmp / ".shared_index.lock").write_text(json.dumps(  # another run's build of this --index
      {"tool": "index", "pid": 1, "host": socket.gethostname(), "since": "earlier"}))
  # pid 1 is alive on every machine: a live holder, so the lock is not stale.
  (tmp / "locked" / "writer.lock").write_text(json.dumps(
      {"tool": "train", "pid": 1, "host": socket.gethostname(), "since": "earlier"}))
  m = cfg.prototypes.num_prototypes
  ctl.save(str(tmp / "nan_gain.json"), ctl.zeros(m), {})
  record = json.loads((tmp / "nan_gain.json").read_text())
  record["gain"][3] = float("nan")
  (tmp / "nan_gain.json").write_text(json.dumps(record))
  sup.save(str(tmp / "string_ids.json"), [1], {})
  record = json.loads((tmp / "string_ids.json").read_text())
  record["prototypes"] = "123"
  (tmp / "string_ids.json").write_text(json.dumps(record))
  sup.save(str(tmp / "every_id.json"), range(m), {})
  (tmp / "list.json").write_text("[1, 2]")
  (tmp / "site").mkdir()
  (tmp / "site" / "report.html").write_text("<p>my own page</p>")
  (tmp / "old_index").mkdir()
  (tmp / "old_index" / "manifest.json").write_text(json.dumps({
      "format": index_lib.FORMAT, "step": 7, "model_settings": model_settings(cfg),
      "shards": [{"start": 0, "stop": m, "path": "shards/00000"}]}))
  (tmp / "lean_index").mkdir()  # of this checkpoint, built without curvature
  (tmp / "lean_index" / "manifest.json").write_text(json.dumps({
      "format": index_lib.FORMAT, "step": 150, "model_settings": model_settings(cfg),
      "curvature": "none", "shards": [{"start": 0, "stop": m, "path": "shards/00000"}]}))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  """The trained run, its data layer answering with FACTS, and the files rows point at."""
  workdir, cfg = trained_text_model()
  tmp = tmp_path_factory.mktemp("bad_input")
  _bad_files(tmp, workdir, cfg)
  bundle = data_lib.DataBundle(tokenizer=CharTokenizer(), train_source=[FACTS],
                               validation_source=[{"text": FACTS * 4}])
  real_prepare = data_lib.prepare
  with pytest.MonkeyPatch.context() as patch:
    # The data entry point builds for real (its rows are about the corpus); the others read
    # the FACTS run's text and character tokenizer.
    patch.setattr(data_lib, "prepare", lambda data_cfg, *a, **k: (
        real_prepare(data_cfg, *a, **k) if str(tmp) in data_cfg.data_dir else bundle))
    patch.setattr(restore, "load_tokenizer", lambda cfg: bundle.tokenizer)
    yield {RUN: workdir, MISSING: str(tmp / "no_such_run"), TMP: str(tmp)}


def _snapshot(*folders) -> dict:
  """path -> (size, mtime) of every file, and every folder, under `folders`. (A folder's own
  mtime is left out: a lock taken and released touches it and changes nothing.)"""
  seen = {}
  for folder in folders:
    for root, dirs, files in os.walk(folder):
      seen.update({os.path.join(root, name): "folder" for name in dirs})
      for name in files:
        stat = os.stat(os.path.join(root, name))
        seen[os.path.join(root, name)] = (stat.st_size, stat.st_mtime_ns)
  return seen


def _arguments(entry, module, lead, argv, workspace):
  fill = lambda arg: (workspace[arg] if arg in workspace
                      else arg.replace(TMP, workspace[TMP]).replace(RUN, workspace[RUN]))
  lead, argv = [fill(a) for a in lead], [fill(a) for a in argv]
  # A placeholder left in would be a relative path: output in the working folder.
  assert not [a for a in lead + argv if any(p in a for p in (RUN, MISSING, TMP))], argv
  command = lead[:1] if module == "prism_jax.main.control" else []  # a subcommand
  options = lead[len(command):]
  # Overrides first (cli.move_trailing_overrides is tested in test_config.py); a row's
  # options come after the entry point's own, so the row's value wins.
  overrides = [a for a in argv if "=" in a and not a.startswith("-")]
  flags = [a for a in argv if a not in overrides]
  if entry in ("lds", "compare"):
    workdir = [] if "--workdir" in flags else ["--workdir", f"{workspace[TMP]}/study"]
    return overrides + options + flags + workdir
  if entry in ("plan", "data"):
    return ["--exp", "prism_tiny"] + overrides + options + flags
  return (command + ["--exp", "prism_tiny", "--workdir", workspace[RUN]] + overrides
          + options + flags)


@pytest.mark.parametrize("entry, module, lead, argv, message", _cases())
def test_bad_input_is_one_line_exit_2_and_writes_nothing(workspace, capsys, entry, module, lead,
                                                         argv, message):
  args = _arguments(entry, module, lead, argv, workspace)
  before = _snapshot(workspace[RUN], workspace[TMP])
  main = importlib.import_module(module).main
  with pytest.raises(SystemExit) as exit_info:
    main(args)
  err = capsys.readouterr().err.strip()
  assert exit_info.value.code == 2, err
  assert err.splitlines() == [err] and err.startswith("error: ") and message in err, err
  assert _snapshot(workspace[RUN], workspace[TMP]) == before, "a refused command wrote files"


def test_every_entry_point_has_rows():
  counts = {}
  for entry, _ in _rows():
    counts[entry] = counts.get(entry, 0) + 1
  assert set(counts) == set(ENTRY_POINTS)
  assert all(n >= 3 for n in counts.values()), counts
