"""Several training processes on this machine, joined by `jax.distributed` (CPU, gloo).

  python launch/local.py --processes 2 --exp prism_tiny --workdir runs/multiprocess \
      [--compare] [key=value ...]

Each process gets one CPU device and the coordinator on localhost, exactly as hosts of a pod
get theirs from the launch scripts. Data is sharded with `data.process_sharding=global_batch`
so that every process count sees the same global batches. `--compare` also trains with one
process and reports the largest parameter difference (exit 1 above `--tolerance`).
"""

from __future__ import annotations

import os
import subprocess
import sys

import portpicker

if __package__ in (None, ""):  # run as a script: make `launch` importable
  sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))

from launch import common  # noqa: E402
from launch.common import LaunchError, OneLineParser, exit_on_user_error  # noqa: E402


def _env(processes: int, process_id: int, port: int) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  if processes > 1:
    env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(processes),
               JAX_PROCESS_ID=str(process_id))
  return env


def run_processes(processes: int, exp: str, workdir: str, overrides: list[str]) -> None:
  """Starts `processes` trainers and waits for all; raises if any fails."""
  port = portpicker.pick_unused_port()
  command = [sys.executable, "-m", "prism_jax.main.train", "--exp", exp,
             "--workdir", workdir, "data.process_sharding=global_batch", *overrides]
  print(f"starting {processes} process(es): {' '.join(command[1:])}", flush=True)
  procs = [subprocess.Popen(command, env=_env(processes, i, port), cwd=common.ROOT,
                            stdout=None if i == 0 else subprocess.DEVNULL,
                            stderr=None if i == 0 else subprocess.PIPE, text=True)
           for i in range(processes)]
  failed = []
  for i, proc in enumerate(procs):
    _, err = proc.communicate()
    if proc.returncode != 0:
      failed.append(f"process {i} exited {proc.returncode}"
                    + (f": {err.strip().splitlines()[-1]}" if err and err.strip() else ""))
  if failed:
    raise LaunchError("; ".join(failed))


def largest_difference(exp: str, workdir_a: str, workdir_b: str, overrides: list[str]) -> float:
  import jax
  import numpy as np

  import experiments
  from prism_jax import config as config_lib
  from prism_jax.restore import load_params

  cfg = config_lib.apply_overrides(experiments.get(exp), overrides)
  _, params_a, step_a = load_params(cfg, workdir_a)
  _, params_b, step_b = load_params(cfg, workdir_b)
  if step_a != step_b:
    raise LaunchError(f"runs stopped at different steps ({step_a} vs {step_b})")
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                       params_a, params_b)
  return max(jax.tree.leaves(diffs))


@exit_on_user_error
def main(argv=None):
  parser = OneLineParser(description=__doc__.splitlines()[0])
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument("--exp", default="prism_tiny")
  parser.add_argument("--workdir", default="runs/multiprocess")
  parser.add_argument("--compare", action="store_true",
                      help="also train with one process and compare final parameters")
  parser.add_argument("--tolerance", type=float, default=1e-4)
  parser.add_argument("overrides", nargs="*", metavar="key=value")
  args = parser.parse_args(argv)
  if args.processes < 1:
    raise LaunchError("--processes must be at least 1")
  multi = os.path.join(args.workdir, f"processes-{args.processes}")
  run_processes(args.processes, args.exp, multi, args.overrides)
  if args.compare:
    single = os.path.join(args.workdir, "processes-1")
    run_processes(1, args.exp, single, args.overrides)
    worst = largest_difference(args.exp, multi, single, args.overrides)
    print(f"largest parameter difference, {args.processes} processes vs 1: {worst:.3g}")
    if worst > args.tolerance:
      print(f"error: difference {worst:.3g} exceeds --tolerance {args.tolerance}",
            file=sys.stderr)
      sys.exit(1)


if __name__ == "__main__":
  main()
