"""Small configs and deterministic synthetic batches shared by the tests."""

from __future__ import annotations

import contextlib

import grain
import jax
import numpy as np

import experiments
from prism_jax.config import ExperimentConfig, apply_overrides
from prism_jax.training import TrainData

# jax.monitoring event recorded once per XLA compilation (jax._src.dispatch).
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

TINY_OVERRIDES = [
    "model.vocab_size=128", "model.d_model=32", "model.d_ff=64", "model.num_layers=2",
    "model.num_heads=4", "prototypes.num_prototypes=32", "prototypes.top_k=4",
    "data.batch_size=8", "data.seq_len=16", "train.progress=false",
]


# The toy models that must memorise a few synthetic rows in ~150 steps, or whose planted
# effect was sized on the round-one head, pin it; every other test built on tiny_config runs
# the default head.
ROUND_ONE_HEAD = experiments.ROUND_ONE_HEAD


def tiny_config(*overrides: str, exp: str = "prism_tiny") -> ExperimentConfig:
  return apply_overrides(experiments.get(exp), TINY_OVERRIDES + list(overrides))


def rows_to_batch(rows) -> dict:
  """[B, L+1] token rows -> the model's batch dict (one document per row)."""
  rows = np.asarray(rows, np.int32)
  batch, length = rows.shape[0], rows.shape[1] - 1
  return {
      "inputs": rows[:, :-1], "targets": rows[:, 1:],
      "segment_ids": np.ones((batch, length), np.int32),
      "positions": np.tile(np.arange(length, dtype=np.int32), (batch, 1)),
      "loss_mask": np.ones((batch, length), np.float32),
  }


def random_batch(cfg: ExperimentConfig, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  rows = rng.integers(0, cfg.model.vocab_size, (cfg.data.batch_size, cfg.data.seq_len + 1))
  return rows_to_batch(rows)


def synthetic_data(cfg: ExperimentConfig, num_rows: int = 64, seed: int = 0,
                   nan_steps: frozenset[int] = frozenset(), process_index: int = 0,
                   process_count: int = 1) -> TrainData:
  """A checkpointable grain pipeline over fixed random token rows.

  Batches of the steps in `nan_steps` (1-based) carry a NaN loss mask: a poisoned batch.
  With several processes each takes its slice of the same global batch.
  """
  rng = np.random.default_rng(seed)
  rows = list(rng.integers(0, cfg.model.vocab_size, (num_rows, cfg.data.seq_len + 1)))

  def poison(index, batch):
    if index + 1 in nan_steps:
      batch = dict(batch, loss_mask=np.full_like(batch["loss_mask"], np.nan))
    return batch

  local = cfg.data.batch_size // process_count

  def my_slice(batch):
    return {k: v[process_index * local:(process_index + 1) * local] for k, v in batch.items()}

  train = (grain.MapDataset.source(rows).shuffle(seed=seed).repeat()
           .batch(cfg.data.batch_size).map(rows_to_batch).map_with_index(poison).map(my_slice))
  valid = grain.MapDataset.source(rows[:cfg.data.batch_size * 2]).batch(
      cfg.data.batch_size).map(rows_to_batch).map(my_slice)
  return TrainData(train_iterator=iter(train.to_iter_dataset()),
                   eval_batches=lambda: iter(valid))


class _CompileCount:
  count = 0


@contextlib.contextmanager
def count_backend_compiles():
  """Counts XLA backend compilations (any function) while the block runs: `.count`."""
  counter = _CompileCount()

  def listener(event, duration_secs, **kwargs):
    del duration_secs, kwargs
    if event == _BACKEND_COMPILE_EVENT:
      counter.count += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield counter
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
