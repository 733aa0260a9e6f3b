"""A run's prototype index as the tools open it: the flags of `index` and `attribute`, the
training examples the index covers, and opening the index checked against the loaded step.

The index format itself is prism_jax/attribution/index.py.
"""

from __future__ import annotations

from etils import epath

from prism_jax import cli
from prism_jax.attribution import common, config as attr_config, index as index_lib
from prism_jax.checkpoint import model_settings
from prism_jax.run import Run


def parse(description: str, extra=None):
  parser = cli.base_parser(description)
  parser.add_argument("--step", type=cli.number_flag("--step"),
                      default=None, help="checkpoint step (default latest)")
  parser.add_argument("--index", default=None, help="index directory (default WORKDIR/index)")
  parser.add_argument("--allow-index-mismatch", action="store_true",
                      help="use an index built from another checkpoint step or model settings "
                      "(warns instead of refusing)")
  if extra:
    extra(parser)
  return parser


def resolve(args) -> tuple[Run, attr_config.AttributionConfig]:
  """(the run, on its mesh once entered; the attribution config) from parsed args."""
  exp_overrides, attr_overrides = attr_config.split_overrides(args.overrides)
  opened = Run.open(args.exp, args.workdir, exp_overrides)  # the model trained there
  attr = attr_config.apply_overrides(attr_config.AttributionConfig(), attr_overrides)
  return opened, attr


def training_set(cfg, attr):
  """(TrainingSet over the training split, tokenizer) through prism_jax.data."""
  from prism_jax import data as data_lib

  bundle = data_lib.prepare(cfg.data, cfg.model.vocab_size)
  train = common.from_source(bundle.train_source, bundle.tokenizer, cfg.data.seq_len,
                             cfg.data.text_key, attr.index_examples, attr.index_seed)
  return train, bundle.tokenizer


def open_index(args, run: Run, step: int) -> index_lib.Index:
  """The run's index (--index or WORKDIR/index), checked against the loaded checkpoint."""
  return _open(args.index or run.index, run, step, args.allow_index_mismatch)


def open_if_built(index_dir: str, run: Run, step: int, allow_mismatch: bool):
  """The index in `index_dir` (checked against the loaded checkpoint), or None when none is
  built there: the tools that only enrich their output with it (control, explore)."""
  if not (epath.Path(index_dir) / "manifest.json").is_file():
    return None
  return _open(index_dir, run, step, allow_mismatch)


def _open(index_dir: str, run: Run, step: int, allow_mismatch: bool) -> index_lib.Index:
  # the checkpoint's commit time tells it from an earlier one of the same step
  return index_lib.open_for(index_dir, step, model_settings(run.cfg), allow_mismatch,
                            saved_ns=run.saved_ns(step))
