"""GPU cluster over ssh: one training process per host, wired up for jax.distributed.

  python launch/gpu_cluster.py setup --hosts gpu1,gpu2 --copy
  python launch/gpu_cluster.py train --hosts gpu1,gpu2 --gpus-per-host 8 --exp prism_1b
  python launch/gpu_cluster.py logs | stop --hosts gpu1,gpu2

Process i runs `make train` on host i with JAX_COORDINATOR_ADDRESS=<first host>:<port>,
JAX_NUM_PROCESSES=<hosts>, JAX_PROCESS_ID=i (read by the training entry point's
`jax.distributed.initialize()`). Add `--dry-run` to print the commands; see launch/README.md.
"""

from __future__ import annotations

import shlex
import sys

if __package__ in (None, ""):  # run as a script: make `launch` importable
  sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))

from launch import common  # noqa: E402
from launch.common import Command, LaunchError  # noqa: E402

ACTIONS = ("setup", "train", "logs", "stop")
SSH = ["ssh", "-o", "BatchMode=yes"]  # fail instead of prompting for a password
PIDFILE = "logs/train.pid"


def parse_args(argv=None):
  parser = common.OneLineParser(description=__doc__.splitlines()[0])
  parser.add_argument("action", nargs="?", default="train", choices=ACTIONS,
                      help="what to do (default: train)")
  parser.add_argument("--hosts", help="comma-separated hosts; the first is the coordinator")
  parser.add_argument("--gpus-per-host", type=int, default=8)
  parser.add_argument("--coordinator-port", type=int, default=1234)
  parser.add_argument("--exp", help="experiment name (train)")
  parser.add_argument("--args", default="", help="config overrides, 'key=value ...' (train)")
  parser.add_argument("--workdir", help="WORKDIR for make train (shared storage across hosts)")
  parser.add_argument("--remote-dir", default=common.REMOTE_DIR,
                      help="checkout on every host, relative to home or absolute")
  source = parser.add_mutually_exclusive_group()
  source.add_argument("--repo", help="git URL to clone on every host (setup)")
  source.add_argument("--copy", action="store_true",
                      help="copy this checkout to every host (setup; the default)")
  parser.add_argument("--python", default="python3", help="interpreter for the venv (setup)")
  parser.add_argument("--process", type=int, default=0, help="whose log to follow (logs)")
  parser.add_argument("--dry-run", action="store_true", help="print the commands only")
  return parser.parse_args(argv)


def hosts_of(args) -> list[str]:
  if not args.hosts:
    raise LaunchError("--hosts is required (e.g. --hosts gpu1,gpu2)")
  hosts = [h.strip() for h in args.hosts.split(",")]
  for host in hosts:
    common.check_host(host)
  if len(set(hosts)) != len(hosts):
    raise LaunchError("--hosts lists a host twice; one process per host")
  return hosts


def _ssh(host: str, remote: str) -> Command:
  return [*SSH, host, remote]


def setup(args, hosts: list[str]) -> list[Command]:
  d, py = shlex.quote(args.remote_dir), shlex.quote(args.python)
  out = []
  for host in hosts:
    if args.repo:
      out.append(_ssh(host, f"if [ -d {d}/.git ]; then git -C {d} pull --ff-only; "
                            f"else git clone {shlex.quote(args.repo)} {d}; fi"))
    else:
      out.append(_ssh(host, f"mkdir -p {d}"))
      out.append(["scp", "-o", "BatchMode=yes", "-r",
                  *[str(common.ROOT / p) for p in common.COPY_PATHS], f"{host}:{args.remote_dir}/"])
    out.append(_ssh(host, f"cd {d} && make setup PYTHON={py} && .venv/bin/pip install "
                          f"--quiet 'jax[cuda12]=={common.JAX_VERSION}'"))
  return out


def train(args, hosts: list[str]) -> list[Command]:
  exp, overrides = common.check_experiment(args.exp, args.args)
  coordinator = f"{hosts[0].split('@')[-1]}:{args.coordinator_port}"
  visible = ",".join(str(i) for i in range(args.gpus_per_host))
  out = []
  for i, host in enumerate(hosts):
    env = ["env", f"JAX_COORDINATOR_ADDRESS={coordinator}", f"JAX_NUM_PROCESSES={len(hosts)}",
           f"JAX_PROCESS_ID={i}", f"CUDA_VISIBLE_DEVICES={visible}"]
    line = common.background(env + common.make_train(exp, overrides, args.workdir),
                             f"logs/train-{i}.log", PIDFILE)
    out.append(_ssh(host, f"cd {shlex.quote(args.remote_dir)} && {line}"))
  return out


def logs(args, hosts: list[str]) -> list[Command]:
  if not 0 <= args.process < len(hosts):
    raise LaunchError(f"--process {args.process} is not in [0, {len(hosts) - 1}]")
  log = f"{shlex.quote(args.remote_dir)}/logs/train-{args.process}.log"
  return [_ssh(hosts[args.process], f"tail -n 200 -F {log}")]


def stop(args, hosts: list[str]) -> list[Command]:
  d = shlex.quote(args.remote_dir)
  return [_ssh(host, f"cd {d} && {common.stop_line(PIDFILE)}") for host in hosts]


BUILDERS = {"setup": setup, "train": train, "logs": logs, "stop": stop}


def build(args) -> list[Command]:
  """Validates every argument, then returns the commands `args.action` runs, in order."""
  hosts = hosts_of(args)
  if not 1 <= args.gpus_per_host <= 16:
    raise LaunchError(f"--gpus-per-host {args.gpus_per_host} must be in [1, 16]")
  if not 1 <= args.coordinator_port <= 65535:
    raise LaunchError(f"--coordinator-port {args.coordinator_port} is not a TCP port")
  if args.exp or args.args:
    common.check_experiment(args.exp, args.args)
  return BUILDERS[args.action](args, hosts)


main = common.entry_point(parse_args, build)


if __name__ == "__main__":
  main()
