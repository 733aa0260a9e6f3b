"""Mesh and memory plan for an experiment: `python -m prism_jax.main.plan --exp prism_1b`.

  python -m prism_jax.main.plan --exp prism_1b --topology v5p-64
  python -m prism_jax.main.plan --exp prism_1b --devices 256 --hbm-gib 95 mesh.data=2

The arithmetic plan is prism_jax/plan.py; on a TPU slice with libtpu installed the steps are
then compiled for it (prism_jax/aot.py) and the verdict is the compiled figure's.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from prism_jax import aot, cli, plan
from prism_jax.errors import exit_on_user_error


def parse_args(argv=None) -> argparse.Namespace:
  parser = cli.parser("Mesh and memory plan for an experiment.")
  parser.add_argument("--exp", required=True, help="experiment name (see experiments/)")
  where = parser.add_mutually_exclusive_group()
  where.add_argument("--topology", help="v5p-64, v4-32, v5litepod-16, v6e-8, h100-16, or a "
                     "device count; default: the topology the experiment is planned for, "
                     f"else {plan.DEFAULT_DEVICES} devices")
  where.add_argument("--devices", type=cli.number_flag("--devices"),
                     help="number of devices (with --hbm-gib)")
  parser.add_argument("--hbm-gib", type=cli.number_flag("--hbm-gib"),
                      help="HBM per device; overrides the table")
  parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                      help="on a TPU slice, compile the steps ahead of time for it (needs "
                      "libtpu) and take the verdict from the compiled memory (default: on)")
  parser.add_argument("--steps", default="train,eval,index",
                      help="which steps to compile (comma-separated: train, eval, index)")
  parser.add_argument("overrides", nargs="*", metavar="key=value")
  return parser.parse_args(argv)


def _compiled_check(cfg, topology: plan.Topology, planned: plan.Plan, steps) -> None:
  """Compiles `steps` for the TPU slice, prints the figures, raises if they do not fit."""
  results = aot.compile_for_topology(
      cfg, topology, steps, log=lambda line: print(line, file=sys.stderr, flush=True))
  print(aot.report(results, topology, planned.total_per_device))
  sys.stdout.flush()
  if topology.hbm_gib is not None and not aot.fits(results, topology):
    worst = max(results, key=lambda r: r.memory.total if r.memory else (r.hbm_used or 2**62))
    need = worst.memory.total if worst.memory else worst.hbm_used
    remat = "" if planned.remat == "full" else ", model.remat=full"
    # An out-of-memory compile error names only the temporaries: a lower bound.
    need_text = (plan.format_bytes(need) if worst.memory
                 else f"at least {plan.format_bytes(need)}" if need else "more than its")
    raise plan.PlanError(f"{planned.exp} on {topology.name} (mesh {plan.mesh_text(planned.mesh)}) "
                         f"does not fit: the compiled {worst.name} step needs {need_text} of "
                         f"{topology.hbm_gib:g} GiB HBM per device; try more devices, a "
                         f"smaller data.batch_size{remat}")


@exit_on_user_error
def main(argv=None) -> None:
  import experiments
  from prism_jax import config as config_lib

  args = parse_args(argv)
  steps = [s.strip() for s in args.steps.split(",") if s.strip()]
  unknown = sorted(set(steps) - set(aot.STEPS))
  if unknown or not steps:
    raise plan.PlanError(f"--steps: unknown step {unknown[0] if unknown else args.steps!r} "
                         f"(use a comma-separated list of {', '.join(aot.STEPS)})")
  cfg = config_lib.apply_overrides(experiments.get(args.exp), args.overrides)
  where = (args.topology if args.topology else str(args.devices) if args.devices
           else plan.planned_topology(args.exp) or str(plan.DEFAULT_DEVICES))
  topology = plan.parse_topology(where)
  if args.hbm_gib is not None:
    if args.hbm_gib <= 0:
      raise plan.PlanError("--hbm-gib must be positive")
    topology = dataclasses.replace(topology, hbm_gib=args.hbm_gib)
  planned = plan.make_plan(cfg, topology)
  compile_it = args.compile and not planned.problems and aot.is_tpu_topology(topology)
  hint = compile_it and not aot.libtpu_available()
  compile_it = compile_it and not hint
  print(plan.report(planned, compiled_follows=compile_it))
  if hint:
    print(aot.INSTALL_HINT)
  sys.stdout.flush()
  if not compile_it:
    plan.check(planned)
    return
  _compiled_check(cfg, topology, planned, steps)


if __name__ == "__main__":
  main()
