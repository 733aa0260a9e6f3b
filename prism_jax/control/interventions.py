"""The `--controller` / `--suppress` flags of the inference tools (evaluate, generate), and
the interventions they load: the one place those flags are spelled."""

from __future__ import annotations

import argparse
import sys

from prism_jax.control import controller as control_lib, records, suppress as suppress_lib
from prism_jax.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--controller", default=None, help="a linear prototype controller "
                      "(WORKDIR/controllers/TASK.json, from python -m prism_jax.main.control "
                      "calibrate)")
  parser.add_argument("--suppress", default=None, help="a prototype suppression set "
                      "(WORKDIR/suppressions/NAME.json, from python -m prism_jax.main.control "
                      "suppress)")


def load(args: argparse.Namespace, cfg) -> dict:
  """{'controller': Controller | None, 'suppressed_M': bool [M] | None} from the flags."""
  if (args.controller or args.suppress) and cfg.model.head != "prism":
    raise UserError(f"--controller/--suppress act on prototypes; {cfg.name} has a "
                    f"{cfg.model.head} head")
  num_prototypes = cfg.prototypes.num_prototypes
  return {"controller": (control_lib.load(args.controller, num_prototypes)
                         if args.controller else None),
          "suppressed_M": (suppress_lib.load(args.suppress, num_prototypes,
                                             cfg.prototypes.top_k)
                           if args.suppress else None)}


def warn_if_made_elsewhere(args: argparse.Namespace, run, step: int) -> None:
  """A warning line for each --controller/--suppress file made on another checkpoint than
  the one loaded (`run`'s step `step`): it is applied as asked, and the line says so."""
  flags = [(flag, path) for flag, path in (("--controller", args.controller),
                                           ("--suppress", args.suppress)) if path]
  if not flags:
    return
  saved_ns = run.saved_ns(step)
  for flag, path in flags:
    why = records.other_checkpoint(records.made_on(path), step, saved_ns)
    if why:
      print(f"warning: {flag} {path} was made on {why}", file=sys.stderr)
