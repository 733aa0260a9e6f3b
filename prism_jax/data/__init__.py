"""Data layer: tfds datasets (array_record, no TensorFlow) + SentencePiece + grain pipeline.

  bundle = prepare(cfg.data, cfg.model.vocab_size)   # builds or reuses dataset + tokenizer
  it = make_train_iterator(cfg.data, bundle.tokenizer, bundle.train_source)
  batch = next(it)   # {inputs, targets, segment_ids, positions, loss_mask}, see pipeline.py
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from typing import Any, Iterator, Mapping, Sequence

from etils import epath
from tqdm import tqdm

from prism_jax.config import DataConfig
from prism_jax.data.pipeline import (BATCH_KEYS, iterate_eval_batches, make_train_dataset,
                                     make_train_iterator, to_model_batch)
from prism_jax.data.stats import unigram_entropy
from prism_jax.data.tokenizer import Tokenizer, train_tokenizer
from prism_jax.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_DATASET = "prism_corpus"
TOKENIZER_MAX_EXAMPLES = 200_000  # tokenizer training reads at most this many train examples
TOKENIZER_MAX_CHARS = 200_000_000

__all__ = ["BATCH_KEYS", "DataBundle", "Tokenizer", "iterate_eval_batches", "load_sources",
           "make_train_dataset", "make_train_iterator", "prepare", "to_model_batch",
           "tokenizer_path", "unigram_entropy"]


@dataclasses.dataclass
class DataBundle:
  """What the trainer needs: a tokenizer and random-access train/validation sources."""
  tokenizer: Tokenizer
  train_source: Sequence
  validation_source: Sequence
  tokenizer_path: str = ""
  info: dict[str, Any] = dataclasses.field(default_factory=dict)  # documents, characters, ...


def tokenizer_path(cfg: DataConfig, vocab_size: int) -> str:
  """cfg.tokenizer, else <data_dir>/tokenizer_<vocab>.model (per dataset for other datasets,
  so a data_dir shared by several datasets never mixes their tokenizers)."""
  if cfg.tokenizer:
    return cfg.tokenizer
  if cfg.dataset == DEFAULT_DATASET:
    return str(epath.Path(cfg.data_dir) / f"tokenizer_{vocab_size}.model")
  tag = re.sub(r"[^\w.-]+", "_", cfg.dataset)
  return str(epath.Path(cfg.data_dir) / f"tokenizer_{tag}_{vocab_size}.model")


def _check_text_key(source: Sequence, text_key: str, what: str) -> None:
  if len(source) == 0:
    raise UserError(f"{what} is empty")
  example = source[0]
  if isinstance(example, Mapping) and text_key not in example:
    raise UserError(f"{what} has no feature {text_key!r} (data.text_key); it has "
                    f"{', '.join(sorted(example))}")


def load_sources(cfg: DataConfig) -> tuple[Sequence, Sequence, dict[str, Any]]:
  """(train, validation, info): builds prism_corpus if needed, else opens cfg.dataset."""
  import tensorflow_datasets as tfds  # deferred: heavy import

  if cfg.dataset == DEFAULT_DATASET:
    from prism_jax.data import tfds_corpus

    builder = tfds_corpus.prepare(cfg.data_dir, cfg.validation_fraction, cfg.source_dir)
    sources = builder.as_data_source()
    info = {"dataset_dir": str(builder.data_dir), **dict(builder.info.metadata or {})}
    train, validation = sources["train"], sources["validation"]
  else:
    # A user's tfds dataset (e.g. C4-style), already prepared as array_record in data_dir.
    try:
      sources = tfds.data_source(cfg.dataset, data_dir=cfg.data_dir)
    except Exception as e:  # tfds raises several types; the user needs one line
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise UserError(f"cannot open tfds dataset {cfg.dataset!r} in {cfg.data_dir} "
                      f"(prepare it there as array_record first): {first}") from None
    valid_name = next((s for s in ("validation", "test") if s in sources), None)
    if "train" not in sources or valid_name is None:
      raise UserError(f"tfds dataset {cfg.dataset!r} needs a train and a validation (or test) "
                      f"split; it has {', '.join(sources)}")
    train, validation = sources["train"], sources[valid_name]
    info = {"dataset_dir": str(epath.Path(cfg.data_dir) / cfg.dataset)}
  _check_text_key(train, cfg.text_key, f"the train split of {cfg.dataset}")
  _check_text_key(validation, cfg.text_key, f"the validation split of {cfg.dataset}")
  info["passages"] = {"train": len(train), "validation": len(validation)}
  return train, validation, info


def _training_texts(source: Sequence, text_key: str) -> Iterator[str]:
  """Evenly strided train examples (all of them for the embedded corpus), with progress."""
  stride = max(1, len(source) // TOKENIZER_MAX_EXAMPLES)
  chars = 0
  for i in tqdm(range(0, len(source), stride), desc="tokenizer text", unit="ex",
                leave=False, mininterval=1.0):
    ex = source[i]
    text = ex[text_key] if isinstance(ex, Mapping) else ex
    text = text.decode("utf-8") if isinstance(text, bytes) else text
    chars += len(text)
    yield text
    if chars >= TOKENIZER_MAX_CHARS:
      return


def prepare(cfg: DataConfig, vocab_size: int) -> DataBundle:
  """Builds (first time) or loads the dataset and the tokenizer; returns the sources."""
  t0 = time.perf_counter()
  train, validation, info = load_sources(cfg)
  info["seconds_dataset"] = time.perf_counter() - t0
  log.info("dataset ready in %.1f s: %s", info["seconds_dataset"], info["passages"])
  path = tokenizer_path(cfg, vocab_size)
  t0 = time.perf_counter()
  if epath.Path(path).exists():
    log.info("tokenizer: loading %s", path)
    tok = Tokenizer.load(path)
  elif cfg.tokenizer:
    raise UserError(f"data.tokenizer={cfg.tokenizer} does not exist "
                    "(leave it empty to train one beside the dataset)")
  else:
    log.info("tokenizer: training %d pieces on the train split -> %s", vocab_size, path)
    tok = train_tokenizer(_training_texts(train, cfg.text_key), vocab_size, path)
  info["seconds_tokenizer"] = time.perf_counter() - t0
  log.info("tokenizer ready in %.1f s", info["seconds_tokenizer"])
  if tok.vocab_size > vocab_size:
    raise UserError(f"tokenizer {path} has {tok.vocab_size} pieces but model.vocab_size is "
                    f"{vocab_size}; token ids would fall outside the embedding")
  if tok.vocab_size != vocab_size:
    log.warning("tokenizer %s has %d pieces; model.vocab_size=%d", path, tok.vocab_size,
                vocab_size)
  return DataBundle(tokenizer=tok, train_source=train, validation_source=validation,
                    tokenizer_path=path, info=info)
