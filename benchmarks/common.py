"""What the PRISM-vs-dense benchmarks share: their command line and their device line."""

from __future__ import annotations

import argparse

import jax

from prism_jax import cli


class OverridesParser(argparse.ArgumentParser):
  """argparse that gives a list flag's trailing key=value arguments back to the overrides
  (`--configs small prototypes.top_k=32`), as the entry points do."""

  def parse_known_args(self, args=None, namespace=None):
    namespace, extras = super().parse_known_args(args, namespace)
    cli.move_trailing_overrides(self, namespace)
    check_configs(getattr(namespace, "configs", []), getattr(namespace, "overrides", []))
    return namespace, extras


def check_configs(sizes, overrides) -> None:
  """Every prism_SIZE / dense_SIZE pair exists and takes the overrides: a mistyped size or
  key is one line before anything is measured (not after the first sizes ran)."""
  import experiments
  from prism_jax.config import apply_overrides
  from prism_jax.errors import UserError

  known = [n[len("prism_"):] for n in experiments.names()
           if n.startswith("prism_") and "dense_" + n[len("prism_"):] in experiments.names()]
  for size in sizes:
    if size not in known:
      raise UserError(f"--configs {size!r}: no prism_{size} / dense_{size} pair; sizes: "
                      f"{', '.join(known)}")
    for head in ("prism", "dense"):
      apply_overrides(experiments.get(f"{head}_{size}"), list(overrides))


def parser(doc: str, rounds: int) -> argparse.ArgumentParser:
  """--configs (sizes, each run as prism_SIZE and dense_SIZE), --rounds, and overrides."""
  p = OverridesParser(description=doc.splitlines()[0])
  p.add_argument("--configs", nargs="+", default=["tiny", "small"])
  p.add_argument("--rounds", type=int, default=rounds, help="timings are medians over rounds")
  p.add_argument("overrides", nargs="*", help="key=value applied to both models")
  return p


def devices() -> str:
  return f"{jax.device_count()} {jax.devices()[0].platform} device(s)"
