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
    return namespace, extras


def parser(doc: str, rounds: int) -> argparse.ArgumentParser:
  """--configs (sizes, each run as prism_SIZE and dense_SIZE), --rounds, and overrides."""
  p = OverridesParser(description=doc.splitlines()[0])
  p.add_argument("--configs", nargs="+", default=["tiny", "small"])
  p.add_argument("--rounds", type=int, default=rounds, help="timings are medians over rounds")
  p.add_argument("overrides", nargs="*", help="key=value applied to both models")
  return p


def devices() -> str:
  return f"{jax.device_count()} {jax.devices()[0].platform} device(s)"
