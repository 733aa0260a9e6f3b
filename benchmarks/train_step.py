"""PRISM vs dense train-step time, measured side by side in one process.

  python -m benchmarks.train_step [--configs tiny small] [--rounds 3] [--steps 5]

Both models are compiled first; then rounds alternate between them (dense, prism, dense, ...)
so that machine noise hits both alike. Reported: median seconds per step of each and the
ratio PRISM / dense, which is the figure to quote (absolute CPU times are noise).
"""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np

import experiments
from benchmarks import common
from prism_jax import sharding
from prism_jax.config import apply_overrides
from prism_jax.errors import exit_on_user_error
from prism_jax.step import compile_steps, to_global_batch


def _batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  b, l = cfg.data.batch_size, cfg.data.seq_len
  rows = rng.integers(0, cfg.model.vocab_size, (b, l + 1)).astype(np.int32)
  return {"inputs": rows[:, :-1], "targets": rows[:, 1:],
          "segment_ids": np.ones((b, l), np.int32),
          "positions": np.tile(np.arange(l, dtype=np.int32), (b, 1)),
          "loss_mask": np.ones((b, l), np.float32)}


class StepRunner:
  """One experiment compiled with a fixed random batch; `run(n)` times n train steps."""

  def __init__(self, name, overrides):
    self.cfg = apply_overrides(experiments.get(name), overrides)
    mesh = sharding.make_mesh(self.cfg.mesh)
    self.steps = compile_steps(self.cfg, mesh)
    self.state = self.steps.init()
    self.batch = to_global_batch(_batch(self.cfg), self.steps.batch_sharding)
    self.run(1)  # compile

  def run(self, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
      self.state, metrics = self.steps.train_step(self.state, self.batch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / n


def compare(size: str, rounds: int, steps: int, overrides: list[str]) -> dict:
  runners = {head: StepRunner(f"{head}_{size}", overrides) for head in ("dense", "prism")}
  times = {head: [] for head in runners}
  for _ in range(rounds):
    for head, runner in runners.items():
      times[head].append(runner.run(steps))
  median = {head: statistics.median(t) for head, t in times.items()}
  return {"size": size, "dense_s": median["dense"], "prism_s": median["prism"],
          "ratio": median["prism"] / median["dense"],
          "tokens_per_step": runners["prism"].cfg.data.batch_size * runners["prism"].cfg.data.seq_len}


@exit_on_user_error
def main(argv=None):
  parser = common.parser(__doc__, rounds=3)
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args(argv)
  print(f"train step, PRISM vs dense ({common.devices()}, median of {args.rounds} rounds x "
        f"{args.steps} steps)")
  print(f"{'config':8} {'tokens/step':>11} {'dense s/step':>13} {'prism s/step':>13} "
        f"{'prism/dense':>12}")
  for size in args.configs:
    r = compare(size, args.rounds, args.steps, args.overrides)
    print(f"{r['size']:8} {r['tokens_per_step']:>11} {r['dense_s']:>13.4f} {r['prism_s']:>13.4f} "
          f"{r['ratio']:>12.3f}")


if __name__ == "__main__":
  main()
