"""Does a query copied from a training passage bring that passage back first? And what does
the same-text weight (attr.context_match) change for queries from unseen text?

  python -m benchmarks.copied_queries [--workdir runs/copied] [--weights 0 100]
                                      [key=value | attr.key=value ...]

On the LDS study's model and text (`prism_jax/attribution/study.py`: the same passages,
validation queries and copied queries, the same full-data PRISM model, read from the
study's cache when `--workdir` is the study's), builds one index and, for each weight
gamma, prints for the default method:

- copied queries (reported and tuning, cut from training passages at random positions):
  how often their own passage ranks first (ties count against it) and in the top 5; the
  same for those queries with their prompt cut to its last MID_TOKENS tokens (text from
  the middle of a passage, without its opening: the model reads a shorter context);
- validation queries (reported and tuning): how many have a candidate position whose last
  16 tokens equal theirs, i.e. how many queries' scores the weight changes at all. For
  every other query the scores, hence the LDS, are those of gamma = 0 exactly.

No retraining: the LDS itself is `make lds`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import numpy as np

from prism_jax.attribution import common, ground_truth, run, study, text_examples
from prism_jax.errors import UserError, exit_on_user_error
from prism_jax.models import lm


MID_TOKENS = 24


def own_ranks(prepared, copied) -> list[int]:
  """Rank of each copied query's own passage among all passages (0 = first)."""
  ranks = []
  for example, query in copied:
    s = prepared.query(query).example_scores
    ranks.append(int(np.sum(s >= s[example])) - 1)
  return ranks


def measure(overrides, workdir: str, weights, say=print) -> list[dict]:
  cfg, _, attr = study.check_arguments(overrides, ["single_pass"])
  text = text_examples.load(cfg, attr)
  subsets = ground_truth.draw_subsets(attr.lds_subsets, text.train.num_examples,
                                      attr.lds_fraction)
  directory = ground_truth.cache_dir(workdir, cfg, text.train, text.retrain_queries(), subsets,
                                     attr.lds_seeds, attr.lds_group)
  os.makedirs(directory, exist_ok=True)
  params = ground_truth.full_model(cfg, text.train, 0, attr.lds_group, directory, say)
  graphdef, _ = lm.init(cfg, 0)
  index_dir = os.path.join(workdir, f"index_{cfg.name}_copied")
  copied = text.copied + text.copied_tuning
  mid = [(e, common.Query(q.prompt[-MID_TOKENS:], q.target)) for e, q in copied
         if len(q.prompt) > MID_TOKENS]
  validation = text.queries + text.tuning
  rows, baseline = [], None
  for weight in weights:
    a = dataclasses.replace(attr, context_match=float(weight))
    built = os.path.exists(os.path.join(index_dir, "manifest.json"))
    prepared = run.prepare("single_pass", cfg, graphdef, params, text.train, a,
                           index_dir=index_dir, build_index=not built)
    started = time.perf_counter()
    ranks = np.asarray(own_ranks(prepared, copied))
    mid_ranks = np.asarray(own_ranks(prepared, mid))
    scores = [prepared.query(q).example_scores for q in validation]
    seconds = (time.perf_counter() - started) / (len(copied) + len(mid) + len(validation))
    if baseline is None:
      baseline = scores
    changed = sum(not np.array_equal(s, b) for s, b in zip(scores, baseline))
    rows.append({"weight": float(weight), "top1": float(np.mean(ranks == 0)),
                 "top5": float(np.mean(ranks < 5)), "copied": len(copied),
                 "mid_top1": float(np.mean(mid_ranks == 0)) if len(mid) else None,
                 "mid_top5": float(np.mean(mid_ranks < 5)) if len(mid) else None,
                 "mid": len(mid),
                 "validation_changed": int(changed), "validation": len(validation),
                 "query_ms": 1e3 * seconds, "median_rank": float(np.median(ranks))})
    say(f"  context_match={weight:g}: own passage first {rows[-1]['top1']:.2f}")
  return rows


def table(rows) -> str:
  lines = ["| attr.context_match | copied: own passage 1st (top 5) | median rank | "
           f"cut to the last {MID_TOKENS} tokens: 1st (top 5) | "
           "validation queries whose scores change | query ms |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    mid = ("-" if r["mid_top1"] is None else
           f"{r['mid_top1']:.2f} ({r['mid_top5']:.2f}) of {r['mid']}")
    lines.append(f"| {r['weight']:g} | {r['top1']:.2f} ({r['top5']:.2f}) of {r['copied']} | "
                 f"{r['median_rank']:g} | {mid} | "
                 f"{r['validation_changed']} of {r['validation']} | {r['query_ms']:.1f} |")
  return "\n".join(lines)


@exit_on_user_error
def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default="runs/copied",
                      help="the cache of the study's full-data model and the index "
                           "(runs/lds reuses a `make lds` run's model)")
  parser.add_argument("--weights", nargs="+", type=float, default=[0.0, 100.0],
                      help="attr.context_match values; the first is the baseline the "
                           "validation scores are compared with")
  parser.add_argument("overrides", nargs="*", help="key=value / attr.key=value, as `make lds`")
  args = parser.parse_args(argv)
  if any(w < 0 for w in args.weights):
    raise UserError(f"--weights must be >= 0, got {args.weights}")
  rows = measure(args.overrides, args.workdir, args.weights)
  print(table(rows))


if __name__ == "__main__":
  main()
