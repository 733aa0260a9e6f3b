"""Cloud TPU VMs: create a slice, put the code on every worker, train, follow, stop, delete.

  python launch/tpu.py create --name prism --zone us-east5-a --accelerator-type v5p-64
  python launch/tpu.py setup  --name prism --zone us-east5-a            # copy + make setup
  python launch/tpu.py train  --name prism --zone us-east5-a --exp prism_1b \
      --args "train.steps=1000" --workdir gs://BUCKET/runs/prism_1b
  python launch/tpu.py logs | stop | delete --name prism --zone us-east5-a

Add `--dry-run` to print the gcloud commands instead of running them; see launch/README.md.
"""

from __future__ import annotations

import shlex
import sys

if __package__ in (None, ""):  # run as a script: make `launch` importable
  sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))

from launch import common  # noqa: E402
from launch.common import REMOTE_DIR, Command, LaunchError  # noqa: E402

ACTIONS = ("create", "setup", "train", "logs", "stop", "delete")
# Runtime (OS image) per TPU family, from Cloud TPU's "TPU software versions" page.
RUNTIMES = {"v4": "tpu-ubuntu2204-base", "v5p": "v2-alpha-tpuv5",
            "v5litepod": "v2-alpha-tpuv5-lite", "v6e": "v2-alpha-tpuv6e"}
PIDFILE = "logs/train.pid"


def parse_args(argv=None):
  parser = common.OneLineParser(description=__doc__.splitlines()[0])
  parser.add_argument("action", choices=ACTIONS)
  parser.add_argument("--name", help="TPU VM (and queued resource) name")
  parser.add_argument("--zone", help="e.g. us-east5-a")
  parser.add_argument("--project", help="Google Cloud project (default: gcloud's)")
  parser.add_argument("--accelerator-type", help="e.g. v5p-64, v4-32, v5litepod-16, v6e-8")
  parser.add_argument("--runtime-version", help="TPU software version (default per family)")
  parser.add_argument("--queued", action="store_true",
                      help="create/delete a queued resource instead of a TPU VM directly")
  parser.add_argument("--exp", help="experiment name (train)")
  parser.add_argument("--args", default="", help="config overrides, 'key=value ...' (train)")
  parser.add_argument("--workdir", help="WORKDIR for make train: gs://BUCKET/... (train)")
  parser.add_argument("--workdir-on-vm", action="store_true",
                      help="allow a --workdir on the VM's own disk (train; single-host "
                           "slices only, and lost with the VM)")
  source = parser.add_mutually_exclusive_group()
  source.add_argument("--repo", help="git URL to clone on every worker (setup)")
  source.add_argument("--copy", action="store_true",
                      help="copy this checkout to every worker (setup; the default)")
  parser.add_argument("--python", default="python3.11",
                      help="interpreter for the venv; installed with apt if missing (setup)")
  parser.add_argument("--worker", default="0", help="worker(s) whose log to follow (logs)")
  parser.add_argument("--dry-run", action="store_true", help="print the commands only")
  return parser.parse_args(argv)


def _where(args) -> list[str]:
  flags = [f"--zone={args.zone}"]
  return flags + ([f"--project={args.project}"] if args.project else [])


def _ssh(args, remote: str, worker: str = "all") -> Command:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, *_where(args),
          f"--worker={worker}", f"--command={remote}"]


def create(args) -> list[Command]:
  if not args.accelerator_type:
    raise LaunchError("create needs --accelerator-type (e.g. v5p-64)")
  accelerator = args.accelerator_type
  runtime = args.runtime_version or RUNTIMES[accelerator.split("-")[0]]
  if args.queued:
    return [["gcloud", "compute", "tpus", "queued-resources", "create", args.name,
             f"--node-id={args.name}", *_where(args), f"--accelerator-type={accelerator}",
             f"--runtime-version={runtime}"]]
  return [["gcloud", "compute", "tpus", "tpu-vm", "create", args.name, *_where(args),
           f"--accelerator-type={accelerator}", f"--version={runtime}"]]


def setup(args) -> list[Command]:
  if args.repo:
    d, url = common.REMOTE_DIR, shlex.quote(args.repo)
    fetch = [_ssh(args, f"if [ -d {d}/.git ]; then git -C {d} pull --ff-only; "
                        f"else git clone {url} {d}; fi")]
  else:
    sources = [str(common.ROOT / p) for p in common.COPY_PATHS]
    fetch = [_ssh(args, f"mkdir -p {REMOTE_DIR}"),
             ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", *sources,
              f"{args.name}:{REMOTE_DIR}/", *_where(args), "--worker=all"]]
  py = shlex.quote(args.python)
  install = (f"(command -v {py} >/dev/null || (sudo apt-get update -qq && sudo apt-get install "
             f"-y -qq {py} {py}-venv)) && cd {REMOTE_DIR} && make setup PYTHON={py} && "
             f".venv/bin/pip install --quiet 'jax[tpu]=={common.JAX_VERSION}'")
  return fetch + [_ssh(args, install)]


def train(args) -> list[Command]:
  exp, overrides = common.check_experiment(args.exp, args.args)
  if not (args.workdir or "").startswith("gs://") and not args.workdir_on_vm:
    # `delete` (or a spot VM's preemption) takes the VM's disk, checkpoints and all.
    given = f"--workdir {args.workdir} is" if args.workdir else "without --workdir, the run goes"
    raise LaunchError(f"{given} on the TPU VM's own disk, which `delete` or a preemption "
                      "removes with every checkpoint: give --workdir gs://BUCKET/..., or "
                      "--workdir-on-vm to keep it there anyway")
  cmd = common.make_train(exp, overrides, args.workdir)
  line = common.background(cmd, "logs/train-$(hostname).log", PIDFILE)
  return [_ssh(args, f"cd {REMOTE_DIR} && {line}")]


def logs(args) -> list[Command]:
  return [_ssh(args, f"tail -n 200 -F {REMOTE_DIR}/logs/train-*.log", worker=args.worker)]


def stop(args) -> list[Command]:
  return [_ssh(args, f"cd {REMOTE_DIR} && {common.stop_line(PIDFILE)}")]


def delete(args) -> list[Command]:
  if args.queued:  # --force also deletes the TPU VM the queued resource created
    return [["gcloud", "compute", "tpus", "queued-resources", "delete", args.name,
             *_where(args), "--force", "--quiet"]]
  return [["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *_where(args),
           "--quiet"]]


BUILDERS = {"create": create, "setup": setup, "train": train, "logs": logs, "stop": stop,
            "delete": delete}


def build(args) -> list[Command]:
  """Validates every argument, then returns the commands `args.action` runs, in order."""
  common.check_name(args.name)
  if not args.zone:
    raise LaunchError("--zone is required (e.g. us-east5-a)")
  common.check_zone(args.zone)
  if args.accelerator_type:
    common.check_accelerator(args.accelerator_type)
  if args.project:
    common.check_project(args.project)
  if args.exp or args.args:
    common.check_experiment(args.exp, args.args)
  if args.worker != "all" and not args.worker.isdigit():
    raise LaunchError(f"--worker {args.worker!r} must be a worker number or 'all'")
  return BUILDERS[args.action](args)


main = common.entry_point(parse_args, build)


if __name__ == "__main__":
  main()
