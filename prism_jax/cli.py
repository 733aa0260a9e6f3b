"""Shared command-line handling: `--exp NAME --workdir DIR key=value ...` for every entry point."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys

from etils import epath

from prism_jax import config as config_lib
from prism_jax import layout, limits
from prism_jax.config import ConfigError, ExperimentConfig
from prism_jax.errors import UserError


# A config override as users type it: a dotted key, then "=" (`train.seed=1`).
_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)*=")


def looks_like_override(text) -> bool:
  return isinstance(text, str) and bool(_OVERRIDE.match(text))


def move_trailing_overrides(parser: argparse.ArgumentParser, namespace: argparse.Namespace):
  """`--tasks piqa train.seed=1`: a list flag swallows the key=value arguments after it;
  they go back to the overrides, where the user meant them (not "unknown task").

  Flags marked free text (`--prompts`) keep everything: a prompt may contain "=".
  """
  if not isinstance(getattr(namespace, "overrides", None), list):
    return
  for action in parser._actions:
    values = getattr(namespace, action.dest, None)
    if (not action.option_strings or action.nargs not in ("+", "*")
        or getattr(action, "free_text", False) or not isinstance(values, list)):
      continue
    cut = next((i for i, v in enumerate(values) if looks_like_override(v)), None)
    if cut is None:
      continue
    if cut == 0 and action.nargs == "+":
      parser.error(f"{'/'.join(action.option_strings)} needs a value before "
                   f"{values[0]!r} (a key=value override)")
    setattr(namespace, action.dest, values[:cut])
    namespace.overrides = [*namespace.overrides, *values[cut:]]


class Parser(argparse.ArgumentParser):
  """argparse with one-line errors (`error: ...`, exit 2) and ranged numeric flags only.

  `add_argument(..., free_text=True)`: a list flag whose values may contain "=" and are
  never read as overrides (`move_trailing_overrides`).
  """

  def error(self, message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)

  def add_argument(self, *args, free_text: bool = False, **kwargs):
    action = super().add_argument(*args, **kwargs)
    action.free_text = free_text
    return action

  def parse_known_args(self, args=None, namespace=None):
    for action in self._actions:
      if action.type in (int, float):  # a programming error: the flag has no range
        raise TypeError(f"{'/'.join(action.option_strings)} must use cli.number_flag "
                        "(prism_jax/limits.py FLAG_RANGES)")
    namespace, extras = super().parse_known_args(args, namespace)
    move_trailing_overrides(self, namespace)
    return namespace, extras


def utf8_text(text: str) -> str:
  """argparse `type=` for text the tokenizer reads (a prompt, words): the command line's
  bytes must be UTF-8 (Python keeps other bytes as lone surrogates, which sentencepiece
  cannot take)."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    bad = ord(text[e.start])
    byte = f"byte 0x{bad - 0xDC00:02x}" if 0xDC80 <= bad <= 0xDCFF else f"U+{bad:04X}"
    raise argparse.ArgumentTypeError(f"is not UTF-8 text ({byte} at character {e.start})"
                                      ) from None
  return text


utf8_text.__name__ = "UTF-8 text"


def number_flag(flag: str):
  """argparse `type=` for a numeric flag: parses and checks it against its FLAG_RANGES row."""
  valid, _ = limits.FLAG_RANGES[flag]

  def parse(text: str):
    try:
      value = valid.kind(text)
    except ValueError:
      hint = (f" (a key=value override: put it before {flag})" if looks_like_override(text)
              else "")
      raise argparse.ArgumentTypeError(f"{text!r} is not a valid {valid.kind.__name__}{hint}"
                                       ) from None
    if not valid.contains(value):
      raise argparse.ArgumentTypeError(f"must be {valid.describe()}, got {text}")
    return value

  parse.__name__ = valid.kind.__name__
  return parse


def parser(description: str) -> Parser:
  return Parser(description=description)


def base_parser(description: str) -> argparse.ArgumentParser:
  parser = Parser(description=description)
  parser.add_argument("--exp", default="prism_tiny", help="experiment name (see experiments/)")
  parser.add_argument("--workdir", default=None, help="run directory (default runs/<exp>)")
  parser.add_argument("overrides", nargs="*", metavar="key=value",
                      help="config overrides, e.g. train.steps=200 model.d_model=64")
  return parser


def resolve(args: argparse.Namespace) -> tuple[ExperimentConfig, str]:
  """(config with overrides applied, workdir)."""
  import experiments  # deferred: the registry imports every family

  cfg = config_lib.apply_overrides(experiments.get(args.exp), args.overrides)
  workdir = args.workdir or os.path.join("runs", cfg.name)
  if not _reachable_folder_or_absent(workdir):
    raise UserError(f"--workdir {workdir} is a file, not a run directory")
  from prism_jax.attribution.index import is_index  # deferred: the index module is large

  if is_index(workdir):  # a run trained there would be deleted when the index is rebuilt
    raise UserError(f"--workdir {workdir} is a prototype index, not a run directory (an index "
                    "lives inside its run, WORKDIR/index by default)")
  return cfg, workdir


class _NoTraceback(logging.Filter):
  """Keeps a storage client's retry messages to their one line (no exception dump)."""

  def filter(self, record):
    record.exc_info, record.exc_text = None, None
    return True


def _reachable_folder_or_absent(workdir: str) -> bool:
  """False when `workdir` is a file. A bucket that cannot be reached (no network, no
  credentials, no client library) is one line naming it, before any work."""
  storage_log = logging.getLogger("gcsfs")
  quiet = _NoTraceback()
  storage_log.addFilter(quiet)
  try:
    path = epath.Path(workdir)
    return not path.exists() or path.is_dir()
  except ImportError as e:  # fsspec names the package a scheme needs
    raise UserError(f"--workdir {workdir}: {e}") from None
  except OSError as e:
    raise UserError(f"--workdir {workdir} cannot be reached: {e.strerror or e}") from None
  finally:
    storage_log.removeFilter(quiet)


def config_path(workdir: str) -> epath.Path:
  # epath: the same code reads and writes local paths and gs:// buckets (shared pod workdirs).
  return epath.Path(workdir) / layout.CONFIG


# Each checkpoint carries its model settings and refuses others, so a run's config.json can
# be rebuilt by running again with the run's experiment and overrides.
_CONFIG_REMEDY = ("fix it, or remove it and run again with the run's --exp and overrides "
                  "(each checkpoint refuses other model settings)")


def read_run_config(path) -> dict:
  """The saved config.json as a dict; a hand-edit that broke it is one line, not a traceback."""
  try:
    saved = json.loads(epath.Path(path).read_text())
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f"cannot read {path}: {e}") from None
  except ValueError as e:
    raise UserError(f"{path} is not valid JSON ({e}); {_CONFIG_REMEDY}") from None
  if not isinstance(saved, dict) or not isinstance(saved.get("name"), str):
    raise UserError(f"{path} is not a run's config (a JSON object naming its experiment); "
                    f"{_CONFIG_REMEDY}")
  return saved


# Settings that change how a step computes, not the model it trains: a run may resume
# under another value (the head in blocks gives the same losses and gradients).
_HOW_NOT_WHAT = frozenset({"prototypes.score_blocks"})

# The data settings that decide which tokens the run reads, in what order, and which
# documents it holds out. The saved input position belongs to that stream, and a resume
# under another validation split would score documents the run has trained on.
DATA_STREAM = ("dataset", "text_key", "validation_fraction", "seq_len", "batch_size",
                "shuffle_seed", "process_sharding")


def check_run_config(cfg: ExperimentConfig, workdir: str) -> None:
  """Refuses to resume a run whose model, seed or data stream differs from `cfg` (its
  config.json says so). Where the data lives (data_dir, source_dir) may change."""
  path = config_path(workdir)
  if not path.exists():
    return
  saved = read_run_config(path)
  current = config_lib.to_dict(cfg)
  for section in ("model", "prototypes"):
    stored = saved.get(section) if isinstance(saved.get(section), dict) else {}
    try:
      trained = (config_lib.to_dict(config_lib.as_trained(getattr(cfg, section), stored))
                 if stored else {})
    except (ValueError, TypeError) as e:
      raise UserError(f"{path} does not hold a valid {section} section ({e}); fix it or "
                      "use another --workdir") from None
    for key, value in current[section].items():
      if f"{section}.{key}" in _HOW_NOT_WHAT:
        continue
      old = trained.get(key)
      if old != value:
        raise ConfigError(f"{workdir} holds a run with {section}.{key}={old!r}, not {value!r}; "
                          "use another --workdir or the same settings")
  train = saved.get("train") if isinstance(saved.get("train"), dict) else {}
  old, value = train.get("seed", current["train"]["seed"]), current["train"]["seed"]
  if old != value:  # its initial parameters, the keys key drift is measured from, the label
    raise ConfigError(f"{workdir} holds a run started with train.seed={old!r}, not {value!r}; "
                      "use another --workdir or the same seed")
  data = saved.get("data") if isinstance(saved.get("data"), dict) else {}
  for key in DATA_STREAM:
    old, value = data.get(key, current["data"][key]), current["data"][key]
    if old != value:
      raise ConfigError(f"{workdir} holds a run trained with data.{key}={old!r}, not {value!r} "
                        "(a resume must read the same token stream and hold out the same "
                        "documents); use another --workdir or the same setting")


def write_run_config(cfg: ExperimentConfig, workdir: str) -> None:
  """Records the run's resolved config (process 0; processes of a pod share the workdir)."""
  import jax  # deferred: --help stays instant

  if jax.process_index() != 0:
    return
  from prism_jax import outputs  # deferred: outputs imports nothing heavy, but keep cli light

  outputs.write_json(config_path(workdir), config_lib.to_dict(cfg))
