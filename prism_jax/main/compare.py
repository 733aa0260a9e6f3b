"""The PRISM-vs-dense study: `python -m prism_jax.main.compare [--prism NAME] [key=value]`.

Trains (or resumes / reuses) the PRISM experiment and its dense twin with the same data,
tokens and seed, evaluates both the same way, and writes a side-by-side table (validation
loss, bits per byte, each task's accuracy, average accuracy, train-step time) as Markdown and
JSON plus a loss-curve plot (PNG) under --workdir (default runs/compare); the study is
prism_jax/comparison.py.
"""

from __future__ import annotations

import time

from prism_jax import cli, downstream, outputs
from prism_jax.comparison import check_matched, markdown_table, run_study
from prism_jax.config import apply_overrides
from prism_jax.errors import exit_on_user_error


@exit_on_user_error
def main(argv=None):
  parser = cli.parser(__doc__.splitlines()[0])
  parser.add_argument("--prism", default="prism_small", help="the PRISM experiment")
  parser.add_argument("--dense", default=None, help="its dense twin (default: dense_<size>)")
  parser.add_argument("--workdir", default="runs/compare")
  parser.add_argument("--tasks", nargs="+", default=["all"], help="'none' to skip")
  parser.add_argument("--limit", type=cli.number_flag("--limit"),
                      default=500, help="documents per task (0: all)")
  parser.add_argument("--val-batches", type=cli.number_flag("--val-batches"), default=None,
                      help="validation batches (default: the whole split)")
  parser.add_argument("overrides", nargs="*", metavar="key=value", help="applied to both runs")
  args = parser.parse_args(argv)
  import experiments

  dense_name = args.dense or args.prism.replace("prism", "dense", 1)
  prism_cfg = apply_overrides(experiments.get(args.prism), args.overrides)
  dense_cfg = apply_overrides(experiments.get(dense_name), args.overrides)
  check_matched(prism_cfg, dense_cfg)  # before the task data: cheapest mistakes first
  tasks = [] if args.tasks == ["none"] else downstream.resolve_tasks(args.tasks)
  if tasks:
    downstream.check_request_files(tasks)
  started = time.perf_counter()
  with outputs.WorkdirLock(args.workdir, "compare", create=True):
    study = run_study(prism_cfg, dense_cfg, args.workdir, tasks, args.limit or None,
                      args.val_batches)
  if study is None:  # training was stopped and saved; it said so
    return
  print()
  print(markdown_table(study))
  print(f"done in {time.perf_counter() - started:.0f}s: {args.workdir}/compare.md, "
        f"compare.json, loss_curves.png")


if __name__ == "__main__":
  main()
