"""`prism_jax.evaluate`: loss / bits per byte, downstream tasks, JSON output, user errors."""

import json
import math

import numpy as np
import pytest

from prism_jax import data as data_lib
from prism_jax import downstream, evaluate
from tests.test_downstream import synthetic_docs, write_requests
from tests.text_model import FACTS, CharTokenizer, trained_text_model


def test_text_batches_score_every_token_exactly_once():
  tok = CharTokenizer()
  text = "".join(chr(ord("a") + i % 26) for i in range(150))
  batches = list(evaluate.text_batches(tok, text, seq_len=32, batch_size=2))
  scored = np.concatenate([b["targets"][b["loss_mask"] > 0] for b in batches])
  assert scored.tolist() == tok.encode(text)  # BOS first, so even the first char is a target
  assert all(b["inputs"].shape == (2, 32) for b in batches)


@pytest.fixture
def prepared(monkeypatch):
  """The trained FACTS model, with the data layer answering with its text and tokenizer."""
  workdir, cfg = trained_text_model()
  bundle = data_lib.DataBundle(tokenizer=CharTokenizer(), train_source=[FACTS],
                               validation_source=[{"text": FACTS * 4}, {"text": FACTS * 3}])
  monkeypatch.setattr(data_lib, "prepare", lambda *args, **kwargs: bundle)
  return workdir, cfg


def _evaluate(workdir, *flags):
  return evaluate.run(evaluate.parse_args(
      ["--exp", "prism_tiny", "--workdir", workdir, "--no-progress", *flags]))


def test_evaluate_reports_loss_bpb_and_tasks_as_json(prepared, tmp_path):
  workdir, _ = prepared
  for spec in downstream.TASKS.values():
    write_requests(tmp_path, spec, synthetic_docs(spec, n=4))
  results = _evaluate(workdir, "--tasks", "piqa", "winogrande", "lambada", "--limit", "3",
                      "--task-data", str(tmp_path))
  with open(results["json"]) as f:
    saved = json.load(f)
  assert saved["step"] == 150 and saved["experiment"] == "prism_tiny"
  val = saved["validation"]
  # The model learnt FACTS: far below the uniform 7 bits per (ASCII) byte.
  assert val["bits_per_byte"] < 1.0 and math.isclose(val["perplexity"], math.exp(val["loss"]))
  assert 0.0 <= val["dead_prototypes"] <= 1.0
  assert set(saved["tasks"]) == {"piqa", "winogrande", "lambada"}
  assert all(m["examples"] == 3 for m in saved["tasks"].values())
  assert "accuracy_per_char" in saved["tasks"]["piqa"]
  assert "bits_per_byte" in saved["tasks"]["lambada"]
  table = evaluate.format_table(saved)
  assert "piqa" in table and "bits/byte" in table


def test_text_file_bits_per_byte(prepared, tmp_path):
  workdir, _ = prepared
  path = tmp_path / "facts.txt"
  path.write_text(FACTS * 6, encoding="utf-8")
  m = _evaluate(workdir, "--text-file", str(path), "--tasks", "none")["text_file"]
  assert m["bytes"] == len(FACTS * 6) == m["tokens"]  # one char = one token = one byte
  np.testing.assert_allclose(m["bits_per_byte"], m["loss"] / math.log(2), rtol=1e-6)
  assert m["bits_per_byte"] < 1.0


@pytest.mark.parametrize("flags,message", [
    (["--tasks", "hellaswag", "piqaa"], "unknown task 'piqaa' (did you mean 'piqa'?)"),
    (["--text-file", "/nonexistent/x.txt", "--tasks", "none"],
     "--text-file /nonexistent/x.txt does not exist"),
    (["--step", "7", "--tasks", "none"], "no checkpoint for step 7"),
])
def test_user_errors_are_one_line(prepared, capsys, flags, message):
  workdir, _ = prepared
  with pytest.raises(SystemExit) as exit_info:
    evaluate.main(["--exp", "prism_tiny", "--workdir", workdir, *flags])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and message in err and "\n" not in err


def test_missing_checkpoint_is_a_user_error(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    evaluate.main(["--exp", "prism_tiny", "--workdir", str(tmp_path / "none"), "--tasks",
                   "none"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert "no checkpoints in" in err and "make train EXP=prism_tiny" in err and "\n" not in err


def test_saved_interventions_apply_to_evaluate(prepared, tmp_path):
  """--controller with g = b = 0 changes nothing; --suppress of every prototype but the
  top-k's worth changes the loss (the remaining prototypes must fill in)."""
  from prism_jax.control import controller as control_lib, suppress as suppress_lib
  from prism_jax.models import prism_head

  workdir, cfg = prepared
  m = cfg.prototypes.num_prototypes
  zeros = np.zeros(m, np.float32)
  identity = control_lib.save(str(tmp_path / "identity.json"),
                              prism_head.Controller(gain_M=zeros, bias_M=zeros), {})
  most = suppress_lib.save(str(tmp_path / "most.json"), range(m - cfg.prototypes.top_k), {})
  plain = _evaluate(workdir, "--tasks", "none")["validation"]
  controlled = _evaluate(workdir, "--tasks", "none", "--controller", identity)
  suppressed = _evaluate(workdir, "--tasks", "none", "--suppress", most)["validation"]
  assert controlled["validation"]["loss"] == plain["loss"]
  assert controlled["controller"] == identity
  assert suppressed["loss"] > plain["loss"] + 0.1
  assert suppressed["dead_prototypes"] >= (m - cfg.prototypes.top_k) / m
