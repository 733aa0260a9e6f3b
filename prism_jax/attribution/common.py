"""Shared pieces: training examples as token rows, queries, per-example losses and gradients.

A training *example* is one token row [L+1] (a passage's first L+1 tokens, padded); its
*positions* are the L next-token predictions in it (padding positions carry no loss). A
*query* is one next-token prediction: a prompt and the token that follows it. Scores are
signed so that positive means "proponent": training on the example makes the query's
token more likely. Gradients come from `lm.forward` through jax.grad / jax.vmap; no model
code is repeated here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prism_jax.models import lm


@dataclasses.dataclass
class TrainingSet:
  """Examples as padded token rows; `example_ids` index the source split."""
  rows: np.ndarray         # [E, L+1] int32
  lengths: np.ndarray      # [E] real tokens per row (<= L+1)
  example_ids: np.ndarray  # [E] int64

  @property
  def num_examples(self) -> int:
    return int(self.rows.shape[0])

  @property
  def seq_len(self) -> int:
    return int(self.rows.shape[1] - 1)

  def num_tokens(self) -> int:
    """Scored positions (predictions with a target), the N of the speed tables."""
    return int(np.maximum(self.lengths - 1, 0).sum())

  def subset(self, index: Sequence[int]) -> "TrainingSet":
    index = np.asarray(index)
    return TrainingSet(self.rows[index], self.lengths[index], self.example_ids[index])

  def batch(self, index: Sequence[int], pad_to: int | None = None) -> dict:
    """Model batch for rows `index`, padded with empty rows to `pad_to`."""
    return rows_to_batch(self.rows[np.asarray(index)], self.lengths[np.asarray(index)], pad_to)


def rows_to_batch(rows_ExL1: np.ndarray, lengths_E: np.ndarray, pad_to: int | None = None
                  ) -> dict:
  """[E, L+1] rows -> inputs/targets/segment_ids/positions/loss_mask [B, L] (B >= E)."""
  rows = np.asarray(rows_ExL1, np.int32)
  lengths = np.asarray(lengths_E)
  if pad_to is not None and pad_to > rows.shape[0]:
    extra = pad_to - rows.shape[0]
    rows = np.concatenate([rows, np.zeros((extra, rows.shape[1]), np.int32)])
    lengths = np.concatenate([lengths, np.zeros(extra, lengths.dtype)])
  length = rows.shape[1] - 1
  t = np.arange(length)[None, :]
  valid = t < (lengths[:, None] - 1)
  return {
      "inputs": rows[:, :-1], "targets": rows[:, 1:],
      # Padding is its own segment (0) so it never attends into the example.
      "segment_ids": (t < lengths[:, None]).astype(np.int32),
      "positions": np.broadcast_to(t, rows[:, :-1].shape).astype(np.int32),
      "loss_mask": valid.astype(np.float32),
  }


def from_rows(rows, lengths=None) -> TrainingSet:
  rows = np.asarray(rows, np.int32)
  lengths = np.full(rows.shape[0], rows.shape[1]) if lengths is None else np.asarray(lengths)
  return TrainingSet(rows, lengths.astype(np.int32), np.arange(rows.shape[0], dtype=np.int64))


def from_source(source, tokenizer, seq_len: int, text_key: str = "text", max_examples: int = 0,
                seed: int = 0) -> TrainingSet:
  """One example per source record: [bos] + ids + [eos], first seq_len+1 tokens.

  `max_examples` > 0 takes a seeded sample (without replacement) of the records.
  """
  n = len(source)
  ids = np.arange(n)
  if 0 < max_examples < n:
    ids = np.sort(np.random.default_rng(seed).choice(n, max_examples, replace=False))
  rows = np.zeros((len(ids), seq_len + 1), np.int32)
  lengths = np.zeros(len(ids), np.int32)
  for i, record_id in enumerate(ids):
    text = source[int(record_id)][text_key]
    text = text.decode("utf-8") if isinstance(text, bytes) else text
    tokens = [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id][:seq_len + 1]
    rows[i, :len(tokens)] = tokens
    lengths[i] = len(tokens)
  return TrainingSet(rows, lengths, ids.astype(np.int64))


@dataclasses.dataclass(frozen=True)
class Query:
  """Predicting `target` right after `prompt` (token ids)."""
  prompt: tuple[int, ...]
  target: int

  @property
  def position(self) -> int:
    return len(self.prompt) - 1

  def batch(self, length: int) -> dict:
    """A one-row batch of fixed `length` (so all queries share one compiled function)."""
    if len(self.prompt) > length:
      raise ValueError(f"prompt of {len(self.prompt)} tokens exceeds length {length}")
    row = np.zeros((1, length + 1), np.int32)
    row[0, :len(self.prompt)] = self.prompt
    row[0, len(self.prompt)] = self.target
    batch = rows_to_batch(row, np.array([len(self.prompt) + 1]))
    batch["loss_mask"] = np.zeros_like(batch["loss_mask"])
    batch["loss_mask"][0, self.position] = 1.0
    return batch


def query_from_example(train: TrainingSet, example: int, position: int) -> Query:
  row = train.rows[example]
  return Query(tuple(int(t) for t in row[:position + 1]), int(row[position + 1]))


# ------------------------------------------------------------------------------------------
# Losses and gradients


def token_losses(graphdef, params, batch) -> jax.Array:
  """Masked next-token cross-entropy per position, [B, L]."""
  logits = lm.forward(graphdef, params, batch).logits
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  return ce * batch["loss_mask"]


def summed_loss(graphdef, params, batch) -> jax.Array:
  """Sum of per-token losses: the loss of an example (or of the query's one position)."""
  return jnp.sum(token_losses(graphdef, params, batch))


def single(batch: dict, i) -> dict:
  return jax.tree.map(lambda x: x[i:i + 1], batch)


def per_example_grads(graphdef, params, batch) -> Any:
  """Gradient of each row's summed loss, a params-shaped tree with a leading [B] axis."""
  def one(row):
    row = jax.tree.map(lambda x: x[None], row)
    return jax.grad(lambda p: summed_loss(graphdef, p, row))(params)
  return jax.vmap(one)(batch)


def tree_dot(a, b) -> jax.Array:
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def chunks(n: int, size: int):
  for start in range(0, n, size):
    yield np.arange(start, min(start + size, n))


def map_examples(train: TrainingSet, batch_size: int, fn: Callable[[dict], Any]) -> np.ndarray:
  """Applies fn to padded batches of examples and concatenates the first-axis results."""
  out = []
  for index in chunks(train.num_examples, batch_size):
    result = np.asarray(fn(train.batch(index, pad_to=batch_size)))
    out.append(result[:len(index)])
  return np.concatenate(out) if out else np.zeros((0,))


def top_examples(scores_E: np.ndarray, k: int) -> np.ndarray:
  """Indices of the k highest scores, ties broken by example order."""
  order = np.lexsort((np.arange(len(scores_E)), -np.asarray(scores_E, np.float64)))
  return order[:k]


def tree_bytes(tree) -> int:
  return sum(int(np.asarray(x).nbytes) for x in jax.tree.leaves(tree))
