"""`prism_jax.main.evaluate`: loss / bits per byte, downstream tasks, JSON output, user errors."""

import json
import math

import jax
import numpy as np
import pytest

from prism_jax import data as data_lib
from prism_jax import downstream, evaluation
from prism_jax.main import evaluate
from tests.test_downstream import synthetic_docs, write_requests
from tests.text_model import FACTS, CharTokenizer, trained_text_model


def test_text_batches_score_every_token_exactly_once():
  tok = CharTokenizer()
  text = "".join(chr(ord("a") + i % 26) for i in range(150))
  batches = list(evaluation.text_batches(tok, text, seq_len=32, batch_size=2))
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
  table = evaluation.format_table(saved)
  assert "piqa" in table and "bits/byte" in table


def test_each_kind_of_evaluation_keeps_a_file_of_its_own(prepared, tmp_path):
  """A quick, text-file or intervened evaluation never replaces another step's results; the
  same request replaces its own."""
  workdir, _ = prepared
  book = tmp_path / "my book.txt"
  book.write_text(FACTS)
  saved = lambda path: json.loads(open(path).read())
  quick = _evaluate(workdir, "--tasks", "none")
  text = _evaluate(workdir, "--tasks", "none", "--text-file", str(book))
  assert quick["json"].endswith("/eval/step_150.tasks-none.json")
  assert text["json"].endswith("/eval/step_150.text-my_book.tasks-none.json")
  assert "validation" in saved(quick["json"]) and "text_file" not in saved(quick["json"])
  assert "text_file" in saved(text["json"])
  assert _evaluate(workdir, "--tasks", "none")["json"] == quick["json"]


def test_request_tags_name_what_differs_from_the_default_evaluation():
  tags = evaluation.request_tags
  assert tags(tasks=list(downstream.TASKS)) == [] and tags() == []
  assert tags(tasks=["piqa", "boolq"], limit=20, val_batches=4) == [
      "tasks-boolq+piqa", "limit-20", "val-4"]
  # --val-batches does not apply to a text file; paths become their plain stems
  assert tags(text_file="/x/a b.txt", val_batches=4, controller="c/piqa.json",
              suppress="s/../lord.json") == ["text-a_b", "controller-piqa", "suppress-lord"]
  assert evaluation.results_path("w", 7, ["tasks-none"]) == "w/eval/step_7.tasks-none.json"


class MultiByteTokenizer(CharTokenizer):
  """CharTokenizer plus a few non-ASCII characters, each two tokens (marker 4, then 5 + its
  index): so for the text below UTF-8 bytes, characters and tokens all differ."""

  EXTRA = "éüïñ✓日本語東京"

  def encode(self, text: str) -> list[int]:
    ids = []
    for c in text:
      if c in self.EXTRA:
        ids += [4, 5 + self.EXTRA.index(c)]
      elif 32 <= ord(c) < 128:
        ids.append(ord(c))
    return ids

  def decode(self, ids) -> str:
    out, ids = [], list(ids)
    for i, t in enumerate(ids):
      if t == 4 and i + 1 < len(ids):
        out.append(self.EXTRA[ids[i + 1] - 5])
      elif t >= 32 and (i == 0 or ids[i - 1] != 4):
        out.append(chr(t))
    return "".join(out)


MULTI_BYTE_TEXT = FACTS + "✓ café über 日本語, naïve 東京. " + FACTS  # six 32-token windows


def test_text_file_bits_per_byte_counts_utf8_bytes(prepared, tmp_path, monkeypatch):
  """bits per byte = total nats / ln 2 / UTF-8 bytes, with nats summed by hand over the
  file's windows (BOS first, each window read fresh) and bytes counted by hand."""
  from prism_jax import restore
  from prism_jax.models import lm

  workdir, cfg = prepared
  tok = MultiByteTokenizer()
  bundle = data_lib.DataBundle(tokenizer=tok, train_source=[FACTS], validation_source=[])
  monkeypatch.setattr(data_lib, "prepare", lambda *args, **kwargs: bundle)
  path = tmp_path / "multi.txt"
  path.write_text(MULTI_BYTE_TEXT, encoding="utf-8")
  m = _evaluate(workdir, "--text-file", str(path), "--tasks", "none")["text_file"]
  ids = [tok.bos_id] + tok.encode(MULTI_BYTE_TEXT)
  num_bytes = len(MULTI_BYTE_TEXT.encode("utf-8"))
  assert len(set([num_bytes, len(MULTI_BYTE_TEXT), len(ids) - 1])) == 3
  assert m["bytes"] == num_bytes and m["tokens"] == len(ids) - 1
  graphdef, params, _ = restore.load_params(cfg, workdir)
  forward = jax.jit(lambda p, x: lm.forward(graphdef, p, {"inputs": x}).logits[0])
  seq_len, nats = cfg.data.seq_len, 0.0
  for start in range(0, len(ids) - 1, seq_len):
    window = np.asarray(ids[start:start + seq_len + 1], np.int32)
    logits = forward(params, window[None, :-1])  # unpadded: the last window is shorter
    logp = np.asarray(jax.nn.log_softmax(logits.astype(np.float32), axis=-1), np.float64)
    nats -= logp[np.arange(len(window) - 1), window[1:]].sum()
  np.testing.assert_allclose(m["loss"], nats / (len(ids) - 1), rtol=1e-4)
  np.testing.assert_allclose(m["bits_per_byte"], nats / math.log(2) / num_bytes, rtol=1e-4)


def test_target_bytes_are_utf8_bytes_of_each_scored_document():
  tok = MultiByteTokenizer()
  docs = ["café 日本", "über ✓ x"]
  batch = {k: np.zeros((2, 16), np.float32 if k == "loss_mask" else np.int32)
           for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}
  a, b = tok.encode(docs[0]), tok.encode(docs[1])
  batch["targets"][0, :len(a)], batch["segment_ids"][0, :len(a)] = a, 1  # two packed docs
  batch["targets"][0, len(a):len(a) + 3], batch["segment_ids"][0, len(a):len(a) + 3] = a[:3], 2
  batch["targets"][1, :len(b)], batch["segment_ids"][1, :len(b)] = b, 1
  batch["loss_mask"][:] = batch["segment_ids"] > 0
  expected = sum(len(d.encode("utf-8")) for d in docs) + len("caf".encode("utf-8"))
  assert expected != sum(len(d) for d in docs) + 3  # bytes, not characters
  assert evaluation.target_bytes(tok, batch) == expected


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
  """--controller with g = b = 0 changes nothing (to rounding); --suppress of every
  prototype but the top-k's worth changes the loss (the remaining prototypes must fill in)."""
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
  # Equal up to rounding: the controller is another compiled program (its fusion may order
  # the same float operations differently).
  assert controlled["validation"]["loss"] == pytest.approx(plain["loss"], rel=1e-6, abs=0)
  assert controlled["controller"] == identity
  assert suppressed["loss"] > plain["loss"] + 0.1
  assert suppressed["dead_prototypes"] >= (m - cfg.prototypes.top_k) / m
