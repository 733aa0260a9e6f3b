"""Real-text examples and queries for the LDS study, through the project's own data code.

Examples are training passages of the embedded corpus (`prism_jax.data.prepare`: the tfds
train split and the sentencepiece tokenizer trained on it for `model.vocab_size`): a seeded
sample of passages long enough to fill a row, each kept as its first `seq_len + 1` tokens
([bos] + pieces). Queries are single next-token predictions inside validation passages
(other documents: the split is by book/address): a seeded passage, a seeded position, the
prompt up to it and the token that follows.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from prism_jax.attribution import common
from prism_jax.errors import UserError

MIN_PROMPT = 8  # a query's prompt has at least this many tokens (some context to attribute)


@dataclasses.dataclass
class StudyText:
  train: common.TrainingSet        # [N, L+1] passage rows; example_ids = train-split ids
  queries: list[common.Query]      # reported
  tuning: list[common.Query]       # disjoint validation tokens for choosing dampings
  source: str                      # what the text is, for every figure's caption
  # [(example, query)] cut from training passages (copied_queries): is their passage first?
  copied: list[tuple[int, common.Query]] = dataclasses.field(default_factory=list)
  copied_tuning: list[tuple[int, common.Query]] = dataclasses.field(default_factory=list)

  def retrain_queries(self) -> list[common.Query]:
    """Every query the retrains read, in the order of their outputs' columns."""
    return (self.queries + self.tuning + [q for _, q in self.copied_tuning]
            + [q for _, q in self.copied])

  def columns(self) -> dict[str, slice]:
    """Each query set's columns in the retrains' outputs."""
    sizes = {"queries": len(self.queries), "tuning": len(self.tuning),
             "copied_tuning": len(self.copied_tuning), "copied": len(self.copied)}
    out, at = {}, 0
    for name, n in sizes.items():
      out[name], at = slice(at, at + n), at + n
    return out


def _text(record, key: str) -> str:
  text = record[key]
  return text.decode("utf-8") if isinstance(text, bytes) else text


def _full_rows(source, tokenizer, length: int, count: int, seed: int, key: str, what: str):
  """(rows [count, length], record ids) of a seeded sample of records with >= length tokens."""
  rng = np.random.default_rng(seed)
  rows, ids = [], []
  for record_id in rng.permutation(len(source)):
    tokens = [tokenizer.bos_id, *tokenizer.encode(_text(source[int(record_id)], key))]
    if len(tokens) >= length:
      rows.append(tokens[:length])
      ids.append(int(record_id))
      if len(rows) == count:
        return np.array(rows, np.int32), np.array(ids, np.int64)
  raise UserError(f"the {what} split has only {len(rows)} passages of at least {length} tokens; "
                  f"{count} are needed (lower attr.lds_examples / attr.lds_queries)")


def queries_from_rows(rows_QxL1: np.ndarray, seed: int) -> list[common.Query]:
  """One query per row at a seeded position: prompt rows[:p+1], target rows[p+1]."""
  rng = np.random.default_rng(seed)
  length = rows_QxL1.shape[1] - 1
  out = []
  for row in rows_QxL1:
    p = int(rng.integers(MIN_PROMPT - 1, length))
    out.append(common.Query(tuple(int(t) for t in row[:p + 1]), int(row[p + 1])))
  return out


def copied_queries(train: common.TrainingSet, count: int, seed: int
                   ) -> list[tuple[int, common.Query]]:
  """[(example, query)]: `count` seeded training passages, each cut at a seeded position
  (prompt = the passage up to it, target = its next token): a query whose own passage is
  in the training set, anywhere in it."""
  rng = np.random.default_rng(seed)
  picks = rng.choice(train.num_examples, min(count, train.num_examples), replace=False)
  rows = train.rows[picks]
  return list(zip((int(e) for e in picks), queries_from_rows(rows, seed + 1)))


def load(cfg, attr, seed: int = 0) -> StudyText:
  from prism_jax import data  # deferred: tfds is a heavy import

  bundle = data.prepare(cfg.data, cfg.model.vocab_size)
  length = cfg.data.seq_len + 1
  rows, ids = _full_rows(bundle.train_source, bundle.tokenizer, length, attr.lds_examples, seed,
                         cfg.data.text_key, "train")
  train = common.TrainingSet(rows, np.full(len(rows), length, np.int32), ids)
  wanted = attr.lds_queries + attr.lds_tuning_queries
  held, _ = _full_rows(bundle.validation_source, bundle.tokenizer, length, wanted, seed + 1,
                       cfg.data.text_key, "validation")
  queries = queries_from_rows(held, seed + 2)
  source = (f"{cfg.data.dataset} ({len(bundle.train_source)} train / "
            f"{len(bundle.validation_source)} validation passages), sentencepiece "
            f"{bundle.tokenizer.vocab_size} ({bundle.tokenizer_path})")
  copied = copied_queries(train, attr.lds_copied_tuning + attr.lds_copied_queries, seed=7)
  return StudyText(train, queries[:attr.lds_queries], queries[attr.lds_queries:], source,
                   copied[attr.lds_copied_tuning:], copied[:attr.lds_copied_tuning])
