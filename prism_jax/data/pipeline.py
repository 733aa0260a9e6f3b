"""Grain input pipeline: text examples -> packed, host-local batches in the model's format.

  source -> shuffle -> repeat -> shard by process -> tokenize ([bos] + ids + [eos])
  -> to_iter_dataset -> chunk (<= seq_len + 1 tokens, nothing dropped)
  -> FirstFitPack to seq_len + 1 -> batch -> model format -> thread prefetch

Batch format (numpy, B = cfg.batch_size // process_count, L = cfg.seq_len):
  inputs      int32   [B, L]  tokens
  targets     int32   [B, L]  next tokens (inputs shifted by one)
  segment_ids int32   [B, L]  0 = padding, k > 0 = k-th document piece in the row (of inputs)
  positions   int32   [B, L]  position within its piece, restarting at 0
  loss_mask   float32 [B, L]  1 where the target is the next token of the same piece

A "piece" is a chunk of one example's token sequence; its first token is never a target.
Every non-padding token of a packed row is visible: as an input, or as the row's last target
(then loss_mask is 1 in the last column).
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import grain
import numpy as np

from prism_jax.config import DataConfig
from prism_jax.data.tokenizer import Tokenizer
from prism_jax.errors import UserError

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def local_batch_size(cfg: DataConfig, process_count: int) -> int:
  if cfg.batch_size % process_count:
    raise UserError(f"data.batch_size={cfg.batch_size} is not divisible by the "
                    f"{process_count} processes")
  return cfg.batch_size // process_count


def chunk(ids: Sequence[int], max_len: int) -> list[np.ndarray]:
  """Non-overlapping pieces of at most max_len tokens; together exactly `ids`.

  No piece of one token when avoidable: it would carry no target (a piece's first token is
  never a target), so the last piece borrows a token from the one before.
  """
  ids = np.asarray(ids, np.int32)
  cuts = list(range(0, len(ids), max_len)) + [len(ids)]
  if len(cuts) > 2 and cuts[-1] - cuts[-2] == 1:
    cuts[-2] -= 1
  return [ids[a:b] for a, b in zip(cuts[:-1], cuts[1:])]


class _Tokenize:
  """example -> [bos] + ids + [eos] (int32). A class so grain can name it in its stats."""

  def __init__(self, tokenizer: Tokenizer, text_key: str):
    self.tokenizer, self.text_key = tokenizer, text_key

  def __call__(self, example: Any) -> np.ndarray:
    text = example[self.text_key] if isinstance(example, Mapping) else example
    if isinstance(text, bytes):  # tfds array_record sources return bytes
      text = text.decode("utf-8")
    ids = self.tokenizer.encode(text)
    return np.asarray([self.tokenizer.bos_id, *ids, self.tokenizer.eos_id], np.int32)


class _Chunk(grain.experimental.FlatMapTransform):
  """token array -> pieces of <= max_len tokens, each its own packing element."""

  def __init__(self, max_len: int):
    self.max_len = max_len
    self.max_fan_out = 1 << 20  # only used by the MapDataset flavour

  def flat_map(self, tokens: np.ndarray) -> list[dict[str, np.ndarray]]:
    return [{"tokens": piece} for piece in chunk(tokens, self.max_len)]


class _RowSlice:
  """Keeps this process's rows of a global batch (process_sharding=global_batch)."""

  def __init__(self, start: int, size: int):
    self.start, self.size = start, size

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v[self.start:self.start + self.size] for k, v in batch.items()}


def to_model_batch(packed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Packed rows [B, L+1] (tokens, tokens_segment_ids, tokens_positions) -> model batch."""
  tokens = np.asarray(packed["tokens"], np.int32)
  segments = np.asarray(packed["tokens_segment_ids"], np.int32)
  positions = np.asarray(packed["tokens_positions"], np.int32)
  # Loss only where input and target belong to the same, non-padding piece.
  same = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] > 0)
  return {
      "inputs": tokens[:, :-1],
      "targets": tokens[:, 1:],
      "segment_ids": segments[:, :-1],
      "positions": positions[:, :-1],
      "loss_mask": same.astype(np.float32),
  }


def _packed_batches(ds: grain.IterDataset, cfg: DataConfig, batch: int, *,
                    shuffle_bins: bool) -> grain.IterDataset:
  ds = grain.experimental.FlatMapIterDataset(ds, _Chunk(cfg.seq_len + 1))
  ds = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct={"tokens": cfg.seq_len + 1}, num_packing_bins=batch,
      seed=cfg.shuffle_seed, shuffle_bins=shuffle_bins)
  return ds.batch(batch, drop_remainder=False).map(to_model_batch)


def make_train_dataset(cfg: DataConfig, tokenizer: Tokenizer, source: Sequence, *,
                       process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """The endless training IterDataset (see module docstring); iterate it for batches."""
  batch = local_batch_size(cfg, process_count)
  if len(source) == 0:
    raise UserError("the training split is empty")
  ds = grain.MapDataset.source(source).shuffle(seed=cfg.shuffle_seed).repeat()
  by_examples = cfg.process_sharding == "examples"
  if by_examples:
    ds = ds[process_index::process_count]  # each process sees a disjoint slice of the stream
  ds = ds.map(_Tokenize(tokenizer, cfg.text_key)).to_iter_dataset()
  ds = _packed_batches(ds, cfg, batch if by_examples else cfg.batch_size, shuffle_bins=True)
  if not by_examples:
    ds = ds.map(_RowSlice(process_index * batch, batch))
  if cfg.prefetch > 0:  # a thread, not worker processes: tokenising is cheap
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=cfg.prefetch)
  return ds


def make_train_iterator(cfg: DataConfig, tokenizer: Tokenizer, source: Sequence, *,
                        process_index: int = 0, process_count: int = 1
                        ) -> grain.DatasetIterator:
  """Checkpointable (get_state/set_state) iterator of host-local training batches, forever."""
  return iter(make_train_dataset(cfg, tokenizer, source, process_index=process_index,
                                 process_count=process_count))


def _empty_batch(batch: int, length: int) -> dict[str, np.ndarray]:
  zeros = np.zeros((batch, length), np.int32)
  return {"inputs": zeros, "targets": zeros, "segment_ids": zeros, "positions": zeros,
          "loss_mask": np.zeros((batch, length), np.float32)}


def _pad_rows(b: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
  missing = batch - b["inputs"].shape[0]
  if missing == 0:
    return b
  return {k: np.concatenate([v, np.zeros((missing,) + v.shape[1:], v.dtype)]) for k, v in b.items()}


def iterate_eval_batches(cfg: DataConfig, tokenizer: Tokenizer, source: Sequence, *,
                         num_batches: int | None = None, process_index: int = 0,
                         process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """One deterministic pass (no shuffle, no repeat) in the training batch format.

  The last partial batch is padded with empty rows (loss_mask 0). With several processes
  and num_batches set, a process that runs out yields empty batches up to num_batches, so
  every process makes the same number of (collective) eval steps.
  """
  batch = local_batch_size(cfg, process_count)
  ds = grain.MapDataset.source(source)
  by_examples = cfg.process_sharding == "examples"
  if by_examples:
    ds = ds[process_index::process_count]
  ds = ds.map(_Tokenize(tokenizer, cfg.text_key)).to_iter_dataset()
  ds = _packed_batches(ds, cfg, batch if by_examples else cfg.batch_size, shuffle_bins=False)
  if not by_examples:
    ds = ds.map(_RowSlice(process_index * batch, batch))
  count = 0
  for b in ds:
    if num_batches is not None and count >= num_batches:
      return
    yield _pad_rows(b, batch)
    count += 1
  if process_count > 1 and num_batches is not None:
    for _ in range(num_batches - count):
      yield _empty_batch(batch, cfg.seq_len)
