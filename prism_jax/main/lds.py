"""LDS retrain study on real text: `python -m prism_jax.main.lds [--workdir runs/lds] [...]`.

A small PRISM language model and its dense twin are retrained from scratch on random
half-subsets of training passages of the embedded corpus (several seeds each; retrains are
cached in WORKDIR, so a rerun only rescores), and every attribution method's linear
datamodeling score on validation query tokens is reported with paired bootstrap intervals
and the seed-noise ceiling (prism_jax/attribution/study.py, docs/attribution.md).
Overrides: `key=value` for the study's model, `attr.key=value` for its size and dampings.
"""

from __future__ import annotations

from prism_jax import cli
from prism_jax.attribution import run, study
from prism_jax.errors import exit_on_user_error
from prism_jax.outputs import WorkdirLock


@exit_on_user_error
def main(argv=None):
  parser = cli.parser(__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="runs/lds")
  parser.add_argument("--methods", default=",".join(run.METHODS),
                      help=f"comma-separated, from {', '.join(run.METHODS)}")
  parser.add_argument("overrides", nargs="*", metavar="key=value")
  args = parser.parse_args(argv)
  methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
  study.check_arguments(args.overrides, methods)  # refuse bad input before taking the lock
  with WorkdirLock(args.workdir, "lds", create=True):
    results = study.run_study(args.overrides, workdir=args.workdir, methods=methods)
  print(study.format_table(results))
  print(f"results: {args.workdir}/results.md, results.json")


if __name__ == "__main__":
  main()
