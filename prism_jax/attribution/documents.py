"""Training documents as the index sees them: every token, in chunks the model can read.

An *example* is a whole training document (one record of the training split: [bos] + ids +
[eos], as `prism_jax.data` tokenises it for training). The index scores every target of
every document exactly once: a document of n tokens is cut into chunks of at most L+1
tokens (L = data.seq_len) that overlap by one token,

  chunk c = tokens[c L : c L + L + 1],   c = 0, 1, ...   while c L + 1 < n

so chunk c predicts targets c L + 1 ... c L + L and no target is predicted twice. A scored
position knows its document (ordinal in the corpus) and its offset (it predicts
tokens[offset + 1]). Process p of P indexes the documents whose ordinal is p mod P.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from prism_jax.attribution.common import TrainingSet


@dataclasses.dataclass(frozen=True)
class Document:
  ordinal: int        # its example id in the index (position in the corpus order)
  record_id: int      # its record in the training split
  tokens: np.ndarray  # [n] int32


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A re-iterable sequence of documents (a rerun must see the same stream)."""
  num_documents: int
  open: Callable[[], Iterator[Document]]


def from_training_set(train: TrainingSet) -> Corpus:
  """Each row of `train` is one document (its first `lengths[e]` tokens)."""
  def docs():
    for e in range(train.num_examples):
      yield Document(e, int(train.example_ids[e]), np.asarray(train.rows[e, :train.lengths[e]],
                                                               np.int32))
  return Corpus(train.num_examples, docs)


def from_source(source: Sequence, tokenizer, text_key: str = "text", max_documents: int = 0,
                seed: int = 0) -> Corpus:
  """The training split's records in order (or a seeded sample of `max_documents`, kept in
  order), tokenised like training: [bos] + ids + [eos], nothing cut."""
  n = len(source)
  ids = np.arange(n)
  if 0 < max_documents < n:
    ids = np.sort(np.random.default_rng(seed).choice(n, max_documents, replace=False))

  def docs():
    for ordinal, record in enumerate(ids):
      text = source[int(record)]
      text = text[text_key] if isinstance(text, dict) or hasattr(text, "keys") else text
      text = text.decode("utf-8") if isinstance(text, bytes) else text
      tokens = [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]
      yield Document(ordinal, int(record), np.asarray(tokens, np.int32))
  return Corpus(len(ids), docs)


def for_process(docs: Iterable[Document], process_index: int, process_count: int
                ) -> Iterator[Document]:
  for doc in docs:
    if doc.ordinal % process_count == process_index:
      yield doc


def chunk_starts(num_tokens: int, seq_len: int) -> range:
  """Offsets of a document's chunks (see the module docstring); none below two tokens."""
  return range(0, max(num_tokens - 1, 0), seq_len)


@dataclasses.dataclass
class ChunkBatch:
  """`rows` chunks of one step; rows past `num_chunks` are padding (length 0)."""
  tokens: np.ndarray     # [B, L+1] int32
  lengths: np.ndarray    # [B] tokens in each chunk
  document: np.ndarray   # [B] int64 document ordinal (-1: padding)
  start: np.ndarray      # [B] int64 offset of the chunk's first token in its document
  documents: list        # Documents whose first chunk is in this batch, in order
  num_chunks: int


def batches(docs: Iterable[Document], seq_len: int, rows: int) -> Iterator[ChunkBatch]:
  """Fixed-size batches of consecutive chunks; the same stream gives the same batches."""
  def empty():
    return ChunkBatch(np.zeros((rows, seq_len + 1), np.int32), np.zeros(rows, np.int64),
                      np.full(rows, -1, np.int64), np.zeros(rows, np.int64), [], 0)

  batch = empty()
  for doc in docs:
    starts = chunk_starts(len(doc.tokens), seq_len)
    if not starts:
      batch.documents.append(doc)  # too short to score: still an example (score 0)
    for start in starts:
      if batch.num_chunks == rows:
        yield batch
        batch = empty()
      if start == 0:
        batch.documents.append(doc)
      piece = doc.tokens[start:start + seq_len + 1]
      i = batch.num_chunks
      batch.tokens[i, :len(piece)] = piece
      batch.lengths[i], batch.document[i], batch.start[i] = len(piece), doc.ordinal, start
      batch.num_chunks += 1
  if batch.num_chunks or batch.documents:
    yield batch
