"""Corpus statistics; chiefly the unigram baseline a trained language model must beat."""

from __future__ import annotations

from typing import Iterator, Mapping, Sequence

import numpy as np

from prism_jax.data.pipeline import chunk
from prism_jax.data.tokenizer import Tokenizer
from prism_jax.errors import UserError


def _texts(source: Sequence, max_examples: int | None, text_key: str) -> Iterator[str]:
  n = len(source) if max_examples is None else min(len(source), max_examples)
  for i in range(n):
    ex = source[i]
    text = ex[text_key] if isinstance(ex, Mapping) else ex
    yield text.decode("utf-8") if isinstance(text, bytes) else text


def scored_tokens(source: Sequence, tokenizer: Tokenizer, max_examples: int | None = None, *,
                  seq_len: int | None = None, text_key: str = "text",
                  batch: int = 256) -> np.ndarray:
  """The tokens a model is scored on: targets with loss_mask=1.

  Each example is [bos] + ids + [eos], cut into pieces of <= seq_len + 1 tokens as the
  pipeline does (one piece when seq_len is None); every token after a piece's first counts,
  eos included, bos never.
  """
  out: list[np.ndarray] = []
  texts = list(_texts(source, max_examples, text_key))
  for start in range(0, len(texts), batch):
    for ids in tokenizer.encode_batch(texts[start:start + batch]):
      full = [tokenizer.bos_id, *ids, tokenizer.eos_id]
      pieces = chunk(full, seq_len + 1) if seq_len else [np.asarray(full, np.int32)]
      out += [p[1:] for p in pieces]
  return np.concatenate(out) if out else np.zeros((0,), np.int32)


def unigram_entropy(train_source: Sequence, eval_source: Sequence, tokenizer: Tokenizer,
                    max_examples: int | None = None, *, seq_len: int | None = None,
                    text_key: str = "text") -> float:
  """Cross-entropy (nats/token) on eval targets of an add-one smoothed unigram model.

  Counts come from the scored tokens of (at most max_examples) train examples; the loss is
  averaged over exactly the eval tokens the LM is scored on.
  """
  counts = np.bincount(scored_tokens(train_source, tokenizer, max_examples, seq_len=seq_len,
                                     text_key=text_key), minlength=tokenizer.vocab_size)
  counts = counts[:tokenizer.vocab_size].astype(np.float64) + 1.0
  log_p = np.log(counts) - np.log(counts.sum())
  targets = scored_tokens(eval_source, tokenizer, max_examples, seq_len=seq_len,
                          text_key=text_key)
  if targets.size == 0:
    raise UserError("the evaluation split has no tokens to score")
  return float(-log_p[targets].mean())
