"""A character-level tokenizer and text pipelines for tests that need words, not random ids."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile

import grain
import numpy as np

from prism_jax.training import TrainData, train
from tests.synthetic import ROUND_ONE_HEAD, rows_to_batch, tiny_config


class CharTokenizer:
  """ASCII characters are their own ids (vocab 128); id 1 is BOS, id 2 is EOS."""

  vocab_size = 128

  def encode(self, text: str) -> list[int]:
    return [ord(c) for c in text if 3 <= ord(c) < 128]

  def decode(self, ids) -> str:
    return "".join(chr(i) for i in ids if i >= 3)

  @property
  def bos_id(self) -> int:
    return 1

  @property
  def eos_id(self) -> int:
    return 2


def text_data(text: str, seq_len: int, batch_size: int, num_rows: int = 256,
              seed: int = 0) -> TrainData:
  """Random windows of a (repeated) text, starting with BOS, as a grain pipeline."""
  tok = CharTokenizer()
  ids = np.asarray(tok.encode(text * (1 + 4 * seq_len // len(text))), np.int32)
  rng = np.random.default_rng(seed)
  starts = rng.integers(0, len(ids) - seq_len, num_rows)
  rows = [np.concatenate([[tok.bos_id], ids[s:s + seq_len]]).astype(np.int32) for s in starts]
  train = (grain.MapDataset.source(rows).shuffle(seed=seed).repeat().batch(batch_size)
           .map(rows_to_batch))
  valid = grain.MapDataset.source(rows[:batch_size]).batch(batch_size).map(rows_to_batch)
  return TrainData(train_iterator=iter(train.to_iter_dataset()), eval_batches=lambda: iter(valid))


FACTS = "a cat is red. a dog is blue. the sun is hot. the ice is cold. "
# (context, choices, gold): the model must have learnt FACTS to answer.
FACT_QUESTIONS = [("a cat is", [" red.", " blue."], 0), ("a dog is", [" red.", " blue."], 1),
                  ("the sun is", [" cold.", " hot."], 1), ("the ice is", [" cold.", " hot."], 0)]
TEXT_MODEL_OVERRIDES = ("data.seq_len=32", "model.max_seq_len=64", "train.steps=150",
                        "train.eval_every=150", "train.log_every=50", "checkpoint.every=150",
                        "optimizer.warmup_steps=20", "optimizer.learning_rate=1e-2",
                        *ROUND_ONE_HEAD)


@functools.lru_cache(maxsize=None)
def trained_text_model(exp: str = "prism_tiny") -> tuple[str, object]:
  """(workdir, cfg) of a tiny model trained on FACTS; trained once per test session."""
  cfg = tiny_config(*TEXT_MODEL_OVERRIDES, exp=exp)
  root = tempfile.mkdtemp(prefix="prism_text_model_")
  atexit.register(shutil.rmtree, root, ignore_errors=True)  # the session's, not the machine's
  workdir = os.path.join(root, exp)
  train(cfg, workdir, text_data(FACTS, cfg.data.seq_len, cfg.data.batch_size))
  return workdir, cfg
