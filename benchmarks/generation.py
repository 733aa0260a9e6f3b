"""Generation tokens/s with and without the KV cache, PRISM and dense, in one process.

  python -m benchmarks.generation [--configs tiny small] [--prompt-tokens 16] [--new-tokens 96]

Random-init models (speed does not depend on training). Greedy decoding of the same prompt;
both paths are compiled first, then rounds alternate (cache, no cache) so machine noise hits
both alike. Reported: median tokens/s of each path and the speed-up of the cache.
"""

from __future__ import annotations

import statistics

import numpy as np

import experiments
from benchmarks import common
from prism_jax.config import apply_overrides
from prism_jax.errors import exit_on_user_error
from prism_jax.models import lm
from prism_jax.sampling import Generator, Sampling


def measure(name: str, prompt_tokens: int, new_tokens: int, rounds: int,
            overrides: list[str]) -> dict:
  cfg = apply_overrides(experiments.get(name), overrides)
  graphdef, params = lm.init(cfg, 0)
  prompt = np.random.default_rng(0).integers(3, cfg.model.vocab_size, prompt_tokens).tolist()
  new_tokens = min(new_tokens, cfg.model.max_seq_len - prompt_tokens)
  generator = Generator(graphdef, cfg, Sampling(temperature=0.0))
  rates = {True: [], False: []}
  for use_cache in (True, False):  # compile both
    generator(params, prompt, 2, use_cache=use_cache)
  for _ in range(rounds):
    for use_cache in (True, False):
      gen = generator(params, prompt, new_tokens, use_cache=use_cache)
      rates[use_cache].append(len(gen.token_ids) / gen.seconds)
  cached, full = statistics.median(rates[True]), statistics.median(rates[False])
  return {"config": name, "context": cfg.model.max_seq_len, "new_tokens": new_tokens,
          "cache_tok_s": cached, "no_cache_tok_s": full, "speedup": cached / full}


@exit_on_user_error
def main(argv=None):
  parser = common.parser(__doc__, rounds=3)
  parser.add_argument("--prompt-tokens", type=int, default=16)
  parser.add_argument("--new-tokens", type=int, default=96)
  args = parser.parse_args(argv)
  print(f"generation, KV cache vs full recompute ({common.devices()}, greedy, batch 1, "
        f"median of {args.rounds})")
  print(f"{'model':12} {'context':>7} {'new':>5} {'cache tok/s':>12} {'no-cache tok/s':>15} "
        f"{'speed-up':>9}")
  for size in args.configs:
    for head in ("prism", "dense"):
      r = measure(f"{head}_{size}", args.prompt_tokens, args.new_tokens, args.rounds,
                  args.overrides)
      print(f"{r['config']:12} {r['context']:>7} {r['new_tokens']:>5} {r['cache_tok_s']:>12.1f} "
            f"{r['no_cache_tok_s']:>15.1f} {r['speedup']:>9.2f}")


if __name__ == "__main__":
  main()
