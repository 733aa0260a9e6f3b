"""Shared command-line handling: `--exp NAME --workdir DIR key=value ...` for every entry point."""

from __future__ import annotations

import argparse
import json
import os

from etils import epath

from prism_jax import config as config_lib
from prism_jax.config import ConfigError, ExperimentConfig


def base_parser(description: str) -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--exp", default="prism_tiny", help="experiment name (see experiments/)")
  parser.add_argument("--workdir", default=None, help="run directory (default runs/<exp>)")
  parser.add_argument("overrides", nargs="*", metavar="key=value",
                      help="config overrides, e.g. train.steps=200 model.d_model=64")
  return parser


def resolve(args: argparse.Namespace) -> tuple[ExperimentConfig, str]:
  """(config with overrides applied, workdir)."""
  import experiments  # deferred: the registry imports every family

  cfg = config_lib.apply_overrides(experiments.get(args.exp), args.overrides)
  return cfg, args.workdir or os.path.join("runs", cfg.name)


def config_path(workdir: str) -> epath.Path:
  # epath: the same code reads and writes local paths and gs:// buckets (shared pod workdirs).
  return epath.Path(workdir) / "config.json"


def write_or_check_run_config(cfg: ExperimentConfig, workdir: str) -> None:
  """Records the run's config; refuses to resume a run whose model differs from `cfg`."""
  path = config_path(workdir)
  current = config_lib.to_dict(cfg)
  if path.exists():
    saved = json.loads(path.read_text())
    for section in ("model", "prototypes"):
      for key, value in current[section].items():
        old = saved.get(section, {}).get(key)
        if old != value and not (isinstance(value, (list, tuple)) and list(value) == old):
          raise ConfigError(f"{workdir} holds a run with {section}.{key}={old!r}, not {value!r}; "
                            "use another --workdir or the same settings")
  import jax  # deferred: --help stays instant

  if jax.process_index() != 0:
    return  # one writer: processes of a multi-host run share the workdir
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f"config.json.tmp{os.getpid()}"
  tmp.write_text(json.dumps(current, indent=2))
  tmp.replace(path)
