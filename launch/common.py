"""Shared by the launch scripts: one-line argument errors, validation, running commands.

Every script builds its whole command list first (validating every argument before anything
runs), then either prints it (`--dry-run`, one `shlex.join`ed command per line) or runs it
with `subprocess`, stopping at the first failure.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import shlex
import subprocess
import sys
from typing import Callable, Sequence

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # scripts run as `python launch/tpu.py` from anywhere
  sys.path.insert(0, str(ROOT))

from prism_jax.errors import UserError, exit_on_user_error  # noqa: E402

Command = list[str]
REMOTE_DIR = "prism-jax"  # on each host, relative to the home directory
# Files `make setup` and `make train` need; copied instead of the whole tree (no .venv/runs).
COPY_PATHS = ("Makefile", "setup.py", "README.md", "prism_jax", "experiments")
JAX_VERSION = "0.10.2"  # == setup.py's pin; the accelerator extra must match it
_ZONE = re.compile(r"[a-z]+-[a-z]+[0-9]+-[a-z]")
_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")  # Google Cloud resource names
_PROJECT = re.compile(r"([a-z][-a-z0-9.]*:)?[a-z][-a-z0-9]{4,28}[a-z0-9]")  # domain:id too
_HOST = re.compile(r"([A-Za-z0-9_.-]+@)?[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")

__all__ = ["UserError", "exit_on_user_error"]


class LaunchError(UserError):
  """A launch argument that cannot be used."""


class OneLineParser(argparse.ArgumentParser):
  """argparse whose errors are one `error: ...` line and exit code 2 (no usage dump)."""

  def error(self, message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check_zone(zone: str) -> str:
  if not _ZONE.fullmatch(zone):
    raise LaunchError(f"--zone {zone!r} is not a zone like us-central2-b or europe-west4-a")
  return zone


def check_name(name: str | None, flag: str = "--name") -> str:
  if not name:
    raise LaunchError(f"{flag} is required")
  if not _NAME.fullmatch(name):
    raise LaunchError(f"{flag} {name!r} must be 1-63 lowercase letters, digits or '-', "
                      "starting with a letter and not ending with '-'")
  return name


def check_project(project: str) -> str:
  if not _PROJECT.fullmatch(project):
    raise LaunchError(f"--project {project!r} is not a project id (6-30 lowercase letters, "
                      "digits or '-')")
  return project


def check_host(host: str) -> str:
  if not _HOST.fullmatch(host):
    raise LaunchError(f"host {host!r} is not a hostname, IP address or user@host")
  return host


def check_accelerator(accelerator: str) -> str:
  from prism_jax import plan  # its topology table imports no jax

  if not plan.is_tpu_accelerator(accelerator):
    families = ", ".join(f"{f}-N" for f in plan.tpu_accelerator_types())
    raise LaunchError(f"unknown --accelerator-type {accelerator!r}; known: {families} "
                      "(v4/v5p count TensorCores: v5p-64 is 32 chips)")
  return accelerator


def check_experiment(exp: str | None, args: str = "") -> tuple[str, str]:
  """(exp, args) after loading the experiment and applying the overrides locally."""
  import experiments  # the registry imports only prism_jax.config: no jax
  from prism_jax import config as config_lib

  if not exp:
    raise LaunchError("--exp is required (see experiments/)")
  config_lib.apply_overrides(experiments.get(exp), shlex.split(args))
  return exp, args


def make_train(exp: str, args: str, workdir: str | None) -> Command:
  """`make train EXP=... [ARGS=...] [WORKDIR=...]` as an argv list."""
  cmd = ["make", "train", f"EXP={exp}"]
  if args.strip():
    cmd.append(f"ARGS={' '.join(shlex.split(args))}")
  if workdir:
    cmd.append(f"WORKDIR={workdir}")
  return cmd


def background(cmd: Command, log: str, pidfile: str) -> str:
  """A shell line that runs `cmd` detached (own process group, survives the ssh session),
  logging to `log` and writing its process group id to `pidfile`."""
  return (f"mkdir -p logs && setsid nohup {shlex.join(cmd)} > {log} 2>&1 < /dev/null & "
          f"echo $! > {pidfile}")


def stop_line(pidfile: str) -> str:
  """SIGTERM the process group in `pidfile` (training checkpoints and exits on SIGTERM)."""
  return (f"if [ -f {pidfile} ]; then kill -TERM -- -$(cat {pidfile}) || true; "
          f"rm -f {pidfile}; else echo 'no {pidfile} on' $(hostname); fi")


def execute(commands: Sequence[Command], dry_run: bool) -> None:
  """Prints the commands (dry run) or runs them in order, stopping at the first failure."""
  if dry_run:
    for cmd in commands:
      print(shlex.join(cmd))
    return
  for i, cmd in enumerate(commands, 1):
    print(f"[{i}/{len(commands)}] {shlex.join(cmd)}", file=sys.stderr, flush=True)
    try:
      rc = subprocess.run(cmd, check=False).returncode
    except FileNotFoundError:
      raise LaunchError(f"{cmd[0]} not found on PATH (use --dry-run to see the commands)")
    if rc != 0:
      print(f"error: step {i}/{len(commands)} failed with exit code {rc}: {shlex.join(cmd)}",
            file=sys.stderr)
      sys.exit(1)


def entry_point(parse_args: Callable[[Sequence[str] | None], argparse.Namespace],
                build: Callable[[argparse.Namespace], list[Command]]):
  """A launch script's `main`: parse, build (validating everything), then run or print."""

  @exit_on_user_error
  def main(argv=None) -> None:
    args = parse_args(argv)
    execute(build(args), args.dry_run)

  return main
