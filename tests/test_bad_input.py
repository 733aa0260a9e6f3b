"""Every entry point answers every bad input a user can type with one line and exit code 2.

The table below is the contract: (entry point, arguments, what the message must say). Each row
runs the entry point's `main` in-process against a small trained run (the FACTS model of
tests/text_model.py) and checks stderr is exactly one `error: ...` line containing the text.
"""

from __future__ import annotations

import gzip
import importlib

import pytest

from prism_jax import data as data_lib
from prism_jax import downstream, restore
from prism_jax.data import corpus
from tests.test_downstream import synthetic_docs, write_requests
from tests.text_model import FACTS, CharTokenizer, trained_text_model

RUN = "{run}"          # replaced by the trained run's workdir
MISSING = "{missing}"  # replaced by a workdir that does not exist
TMP = "{tmp}"          # replaced by a fresh temporary folder
LONG_PROMPT = "a cat is red. " * 10  # 140 characters: past the run's 64-token context

# Inputs every entry point with --exp/--workdir/key=value shares.
COMMON = [
    ("unknown experiment", ["--exp", "prism_tiyn"],
     "unknown experiment 'prism_tiyn' (did you mean 'prism_tiny'?)"),
    ("unknown key", ["train.stepz=3"], "unknown config key 'train.stepz' (did you mean"),
    ("wrong value type", ["train.steps=ten"], "train.steps='ten' is not a valid int"),
]
# ... and every entry point that reads a checkpoint.
CHECKPOINT = [
    ("missing workdir", ["--workdir", MISSING], "no checkpoints in"),
    ("missing checkpoint step", ["--step", "7"], "no checkpoint for step 7"),
    ("mismatched checkpoint", ["model.d_model=64"], "checkpoint shapes differ from the config"),
]

ENTRY_POINTS = {
    # name: (module, leading arguments, extra rows)
    "train": ("prism_jax.train", [], [
        ("workdir of another model", ["--workdir", RUN, "model.d_model=64"],
         "holds a run with model."),
    ]),
    "evaluate": ("prism_jax.evaluate", ["--tasks", "none"], CHECKPOINT + [
        ("unknown task", ["--tasks", "piqaa"], "unknown task 'piqaa' (did you mean 'piqa'?)"),
        ("missing text file", ["--text-file", "/nonexistent/x.txt"], "does not exist"),
        ("non-UTF-8 text file", ["--text-file", f"{TMP}/latin1.txt"], "is not UTF-8 text"),
        ("missing controller", ["--controller", "/nonexistent/c.json"], "no controller at"),
    ]),
    "generate": ("prism_jax.generate", ["--prompt", "a cat is"], CHECKPOINT + [
        ("prompt longer than the context", ["--prompt", LONG_PROMPT], "context"),
        ("missing suppression set", ["--suppress", "/nonexistent/s.json"],
         "no suppression set at"),
    ]),
    "index": ("prism_jax.index", [], CHECKPOINT + [
        ("unknown attribution key", ["attr.dampin=1"], "unknown attribution key 'attr.dampin'"),
    ]),
    "attribute": ("prism_jax.attribute", ["--prompt", "a cat is"], CHECKPOINT + [
        ("prompt longer than the context", ["--prompt", LONG_PROMPT], "context"),
        ("missing index", [], "no prototype index"),
    ]),
    "control calibrate": ("prism_jax.control.__main__", ["calibrate", "--task", "piqa",
                                                         "--task-data", TMP], CHECKPOINT + [
        ("unknown task", ["--task", "piqaa"], "unknown task 'piqaa' (did you mean 'piqa'?)"),
    ]),
    "control suppress": ("prism_jax.control.__main__", ["suppress", "--prototypes", "1",
                                                        "--words", "red"],
                         CHECKPOINT + [
        ("unknown prototype id", ["--prototypes", "999"], "prototype 999 does not exist"),
    ]),
    "explore": ("prism_jax.explore.__main__", ["--no-progress"], CHECKPOINT + [
        ("prompt longer than the context", ["--prompt", LONG_PROMPT], "context"),
    ]),
    "data": ("prism_jax.data.__main__", ["--data-dir", f"{TMP}/cache", "--bench-batches", "0"], [
        ("source folder without the corpus", ["--source-dir", f"{TMP}/nothing"], "lacks"),
        ("empty corpus", ["--source-dir", f"{TMP}/empty"], "the corpus is empty"),
        ("non-UTF-8 corpus", ["--source-dir", f"{TMP}/latin1"], "is not UTF-8 text"),
    ]),
    "plan": ("prism_jax.plan", ["--topology", "v5p-64"], [
        ("unknown topology", ["--topology", "tpu-8"], "tpu-8"),
        ("mesh that does not divide", ["mesh.model=3"], "mesh"),
    ]),
}
# The entry points that take no experiment of their own.
OWN_ARGUMENTS = [
    ("lds", "prism_jax.lds", ["--methods", "prototype,bogus"], "unknown method 'bogus'"),
    ("lds", "prism_jax.lds", ["attr.lds_fraction=2"], "lds_fraction must be in (0, 1)"),
    ("compare", "prism_jax.compare", ["--prism", "prism_tiyn"],
     "unknown experiment 'prism_tiyn'"),
    ("compare", "prism_jax.compare", ["--prism", "prism_tiny", "--dense", "prism_small"],
     "are not matched: they differ in"),
]


def _cases():
  for entry, (module, lead, extra) in ENTRY_POINTS.items():
    rows = ([] if entry == "plan" else COMMON[:1]) + COMMON[1:] + extra
    if entry == "plan":
      rows = [("unknown experiment", ["--exp", "prism_tiyn"], "unknown experiment")] + rows
    for what, argv, message in rows:
      yield pytest.param(module, lead, argv, message, id=f"{entry}: {what}")
  for entry, module, argv, message in OWN_ARGUMENTS:
    yield pytest.param(module, [], argv, message, id=f"{entry}: {message}", marks=())


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


@pytest.fixture(scope="module")
def trained():
  return trained_text_model()


@pytest.fixture
def workspace(trained, tmp_path, monkeypatch):
  """The trained run, its data layer answering with FACTS, and the files rows point at."""
  workdir, cfg = trained
  bundle = data_lib.DataBundle(tokenizer=CharTokenizer(), train_source=[FACTS],
                               validation_source=[{"text": FACTS * 4}])
  real_prepare = data_lib.prepare
  # The data entry point builds for real (its rows are about the corpus); the others read
  # the FACTS run's text and character tokenizer.
  monkeypatch.setattr(data_lib, "prepare", lambda data_cfg, *a, **k: (
      real_prepare(data_cfg, *a, **k) if str(tmp_path) in data_cfg.data_dir else bundle))
  monkeypatch.setattr(restore, "load_tokenizer", lambda cfg: bundle.tokenizer)
  (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 au lait\n")
  write_requests(tmp_path, downstream.TASKS["piqa"], synthetic_docs(downstream.TASKS["piqa"], 4))
  (tmp_path / "nothing").mkdir()
  _empty_sources(tmp_path / "empty")
  _latin1_sources(tmp_path / "latin1")
  return {RUN: workdir, MISSING: str(tmp_path / "no_such_run"), TMP: str(tmp_path)}


@pytest.mark.parametrize("module, lead, argv, message", _cases())
def test_bad_input_is_one_line_and_exit_2(workspace, capsys, module, lead, argv, message):
  fill = lambda arg: (workspace[arg] if arg in workspace
                      else arg.replace(TMP, workspace[TMP]))
  lead, argv = [fill(a) for a in lead], [fill(a) for a in argv]
  command = lead[:1] if module == "prism_jax.control.__main__" else []  # a subcommand
  options = lead[len(command):]
  # Overrides before options: an option taking several values (--tasks a b) would swallow
  # them. A row's options come after the entry point's own, so the row's value wins.
  overrides = [a for a in argv if "=" in a and not a.startswith("-")]
  flags = [a for a in argv if a not in overrides]
  if module in ("prism_jax.lds", "prism_jax.compare"):
    args = overrides + options + flags + ["--workdir", workspace[TMP]]
  elif module == "prism_jax.plan":
    args = ["--exp", "prism_tiny"] + overrides + options + flags
  else:
    args = (command + ["--exp", "prism_tiny", "--workdir", workspace[RUN]] + overrides
            + options + flags)
  main = importlib.import_module(module).main
  with pytest.raises(SystemExit) as exit_info:
    main(args)
  err = capsys.readouterr().err.strip()
  assert exit_info.value.code == 2, err
  # Progress logs may come before it (the data build); the error is the last line, whole.
  assert "Traceback" not in err, err
  last = err.splitlines()[-1]
  assert last.startswith("error: ") and message in last, err
