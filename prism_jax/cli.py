"""Shared command-line handling: `--exp NAME --workdir DIR key=value ...` for every entry point."""

from __future__ import annotations

import argparse
import json
import os

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


def config_path(workdir: str) -> str:
  return os.path.join(workdir, "config.json")


def write_or_check_run_config(cfg: ExperimentConfig, workdir: str) -> None:
  """Records the run's config; refuses to resume a run whose model differs from `cfg`."""
  path = config_path(workdir)
  current = config_lib.to_dict(cfg)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
    for section in ("model", "prototypes"):
      for key, value in current[section].items():
        old = saved.get(section, {}).get(key)
        if old != value and not (isinstance(value, (list, tuple)) and list(value) == old):
          raise ConfigError(f"{workdir} holds a run with {section}.{key}={old!r}, not {value!r}; "
                            "use another --workdir or the same settings")
  os.makedirs(workdir, exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(current, f, indent=2)
  os.replace(tmp, path)
