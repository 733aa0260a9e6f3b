"""Build the prototype index: `python -m prism_jax.index --exp prism_tiny [attr.key=value]`.

One pass over the training split (or a seeded sample, attr.index_examples=N) writing, per
prototype, its top activating training positions (example id, position, activation, text
span) and the influence method's per-prototype state; format in
prism_jax/attribution/index.py and docs/attribution.md.
"""

from __future__ import annotations

import time

from prism_jax import cli, layout, outputs
from prism_jax.attribution import common, config as attr_config, index as index_lib
from prism_jax.checkpoint import model_settings
from prism_jax.errors import exit_on_user_error
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


def open_index(args, cfg, workdir: str, step: int) -> index_lib.Index:
  """The run's index (--index or WORKDIR/index), checked against the loaded step."""
  return index_lib.open_for(args.index or layout.path(workdir, layout.INDEX), step,
                            model_settings(cfg), args.allow_index_mismatch)


@exit_on_user_error
def main(argv=None):
  args = parse(__doc__.splitlines()[0]).parse_args(argv)
  opened, attr = resolve(args)
  out = args.index or opened.index
  outputs.check_folder(out, "prototype index", index_lib.is_index, "--index")
  with opened, outputs.WorkdirLock(opened.workdir, "index"):
    _build(args, opened, attr, out)


def _build(args, opened: Run, attr, out):
  cfg = opened.cfg
  graphdef, params, step = opened.params(args.step)
  train, tokenizer = training_set(cfg, attr)
  started = time.perf_counter()
  manifest = index_lib.build(cfg, graphdef, params, train, out, attr, decode=tokenizer.decode,
                             step=step)
  took = time.perf_counter() - started
  print(f"indexed {manifest['num_examples']} examples, {manifest['num_tokens']} positions, "
        f"{manifest['num_prototypes']} prototypes in {took:.1f}s -> {out}")
  print(f"size: {manifest['bytes_total']} bytes in all; prototype method reads "
        f"{manifest['bytes_by_method']['prototype']} bytes, influence "
        f"{manifest['bytes_by_method']['influence']} bytes")


if __name__ == "__main__":
  main()
