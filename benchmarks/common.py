"""What the PRISM-vs-dense benchmarks share: their command line and their device line."""

from __future__ import annotations

import argparse

import jax


def parser(doc: str, rounds: int) -> argparse.ArgumentParser:
  """--configs (sizes, each run as prism_SIZE and dense_SIZE), --rounds, and overrides."""
  p = argparse.ArgumentParser(description=doc.splitlines()[0])
  p.add_argument("--configs", nargs="+", default=["tiny", "small"])
  p.add_argument("--rounds", type=int, default=rounds, help="timings are medians over rounds")
  p.add_argument("overrides", nargs="*", help="key=value applied to both models")
  return p


def devices() -> str:
  return f"{jax.device_count()} {jax.devices()[0].platform} device(s)"
