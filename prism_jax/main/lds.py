"""LDS retrain study: `python -m prism_jax.main.lds [--workdir runs/lds] [attr.key=value ...]`.

A tiny PRISM model on a synthetic corpus that trains in well under a second: token rows
drawn from a few random sparse bigram "topics" (so examples of a topic help each other).
`attr.lds_subsets` random subsets (each example kept with probability attr.lds_fraction)
are retrained with `attr.lds_seeds` seeds; the retrained log-probabilities of each query's
token are the ground truth, cached in WORKDIR/ground_truth_<hash>.npz. Every method scores
the queries on the model trained on all examples; the linear datamodeling score (mean over
queries of the Spearman correlation) is reported with a bootstrap interval over queries and
the seed-agreement noise ceiling.
"""

from __future__ import annotations

import hashlib
import io
import json
import time

import jax
import numpy as np
from etils import epath

from prism_jax import cli
from prism_jax import layout
from prism_jax.attribution import common, lds as lds_lib, retrain, run
from prism_jax.attribution import config as attr_config
from prism_jax.config import apply_overrides, to_dict
from prism_jax.errors import UserError, exit_on_user_error
from prism_jax.outputs import WorkdirLock, write_json
from prism_jax.models import lm

STUDY_OVERRIDES = [
    "model.vocab_size=64", "model.d_model=32", "model.d_ff=64", "model.num_layers=2",
    "model.num_heads=4", "data.seq_len=16", "model.max_seq_len=16",
    "prototypes.num_prototypes=32", "prototypes.top_k=4", "data.batch_size=8", "train.steps=80",
    "optimizer.warmup_steps=10", "train.progress=false",
]
NUM_TRAIN, NUM_HELD_OUT, NUM_TOPICS = 64, 32, 4


def study_config(overrides=()):
  import experiments

  return apply_overrides(experiments.get("prism_tiny"), STUDY_OVERRIDES + list(overrides))


def synthetic_corpus(vocab: int, seq_len: int, rows: int, seed: int = 0) -> np.ndarray:
  """[rows, seq_len+1] rows, each from one of NUM_TOPICS random sparse bigram chains."""
  rng = np.random.default_rng(seed)
  successors = rng.integers(0, vocab, (NUM_TOPICS, vocab, 3))  # 3 likely next tokens each
  out = np.zeros((rows, seq_len + 1), np.int64)
  for r in range(rows):
    topic = rng.integers(NUM_TOPICS)
    out[r, 0] = rng.integers(vocab)
    for t in range(1, seq_len + 1):
      noise = rng.random() < 0.1
      out[r, t] = rng.integers(vocab) if noise else rng.choice(successors[topic, out[r, t - 1]])
  return out


def _log_probs_fn(graphdef):
  @jax.jit
  def fn(params, batch, positions, targets):
    logp = jax.nn.log_softmax(lm.forward(graphdef, params, batch).logits, -1)
    return logp[np.arange(len(positions)), positions, targets]
  return fn


def ground_truth(cfg, train, queries, attr, cache_path: str, say=print) -> dict:
  """outputs [seeds, subsets, queries] and subsets [subsets, examples], cached."""
  cache = epath.Path(cache_path)
  if cache.exists():
    with cache.open("rb") as f:
      data = dict(np.load(f))
    say(f"ground truth from cache {cache_path}")
    return {"outputs": data["outputs"], "subsets": data["subsets"],
            "seconds": float(data["seconds"])}
  rng = np.random.default_rng(1234)
  subsets = rng.random((attr.lds_subsets, train.num_examples)) < attr.lds_fraction
  graphdef, _ = lm.init(cfg, 0)
  log_probs = _log_probs_fn(graphdef)
  qbatch, positions, targets = _query_batch(queries, cfg.data.seq_len)
  outputs = np.zeros((attr.lds_seeds, attr.lds_subsets, len(queries)))
  started = time.perf_counter()
  for i, mask in enumerate(subsets):
    for s in range(attr.lds_seeds):
      params = retrain.fit(cfg, train.subset(np.nonzero(mask)[0]), seed=s)
      outputs[s, i] = np.asarray(log_probs(params, qbatch, positions, targets))
    if (i + 1) % 10 == 0:
      say(f"  retrained {i + 1}/{attr.lds_subsets} subsets x {attr.lds_seeds} seeds "
          f"({time.perf_counter() - started:.0f}s)")
  seconds = time.perf_counter() - started
  cache.parent.mkdir(parents=True, exist_ok=True)
  saved = io.BytesIO()  # numpy writes local files only; epath writes buckets too
  np.savez(saved, outputs=outputs, subsets=subsets, seconds=seconds)
  cache.write_bytes(saved.getvalue())
  return {"outputs": outputs, "subsets": subsets, "seconds": seconds}


def _query_batch(queries, length):
  batches = [q.batch(length) for q in queries]
  batch = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  return (batch, np.array([q.position for q in queries]), np.array([q.target for q in queries]))


def make_queries(held_out: np.ndarray, count: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  rows = rng.choice(len(held_out), count, replace=count > len(held_out))
  held = common.from_rows(held_out)
  return [common.query_from_example(held, int(r), int(rng.integers(4, held_out.shape[1] - 1)))
          for r in rows]


def run_study(cfg, attr, workdir: str, methods=run.METHODS, say=print) -> dict:
  rows = synthetic_corpus(cfg.model.vocab_size, cfg.data.seq_len, NUM_TRAIN + NUM_HELD_OUT)
  train = common.from_rows(rows[:NUM_TRAIN])
  queries = make_queries(rows[NUM_TRAIN:], attr.lds_queries)
  key = json.dumps([to_dict(cfg), attr.lds_subsets, attr.lds_seeds, attr.lds_fraction,
                    attr.lds_queries, NUM_TRAIN, NUM_HELD_OUT], sort_keys=True, default=str)
  digest = hashlib.sha256(key.encode()).hexdigest()[:12]
  truth = ground_truth(cfg, train, queries, attr, layout.path(workdir, f"ground_truth_{digest}.npz"),
                       say)
  ceiling = lds_lib.noise_ceiling(truth["outputs"])
  ceiling_lo, ceiling_hi = lds_lib.bootstrap_interval(ceiling, attr.lds_bootstrap)
  # LDS is scored against the mean of R seeds, which is less noisy than one seed: the
  # Spearman-Brown step-up of the seed agreement estimates that target's ceiling.
  r = attr.lds_seeds
  stepped = r * ceiling / (1 + (r - 1) * ceiling)
  stepped_lo, stepped_hi = lds_lib.bootstrap_interval(stepped, attr.lds_bootstrap)
  graphdef, _ = lm.init(cfg, 0)
  params = retrain.fit(cfg, train, seed=0)
  results = {"ground_truth_seconds": truth["seconds"], "num_train_examples": NUM_TRAIN,
             "num_train_tokens": train.num_tokens(), "num_queries": len(queries),
             "subsets": attr.lds_subsets, "seeds": attr.lds_seeds,
             "noise_ceiling": {"mean": float(np.nanmean(ceiling)), "low": ceiling_lo,
                               "high": ceiling_hi},
             "noise_ceiling_seed_mean": {"mean": float(np.nanmean(stepped)), "low": stepped_lo,
                                         "high": stepped_hi}, "methods": {}}
  for method in methods:
    started = time.perf_counter()
    prepared = run.prepare(method, cfg, graphdef, params, train, attr,
                           index_dir=layout.path(workdir, layout.INDEX))
    prepare_s = time.perf_counter() - started
    started = time.perf_counter()
    scores = np.stack([prepared.query(q).example_scores for q in queries])
    query_s = (time.perf_counter() - started) / len(queries)
    summary = lds_lib.summary(scores, truth["subsets"], truth["outputs"], attr.lds_bootstrap)
    summary.update(prepare_seconds=prepare_s, query_seconds=query_s,
                   stored_bytes=prepared.stored_bytes)
    results["methods"][method] = summary
    say(f"{method:10s} LDS {summary['lds']:+.3f} [{summary['low']:+.3f}, {summary['high']:+.3f}]"
        f"  (prepare {prepare_s:.2f}s, query {query_s * 1e3:.1f}ms)")
  return results


@exit_on_user_error
def main(argv=None):
  parser = cli.parser(__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="runs/lds")
  parser.add_argument("--methods", default=",".join(run.METHODS))
  parser.add_argument("overrides", nargs="*", metavar="key=value")
  args = parser.parse_args(argv)
  exp_overrides, attr_overrides = attr_config.split_overrides(args.overrides)
  cfg = study_config(exp_overrides)
  attr = attr_config.apply_overrides(attr_config.AttributionConfig(batch_size=16),
                                     attr_overrides)
  methods = tuple(m.strip() for m in args.methods.split(","))
  for method in methods:  # before hours of retraining
    if method not in run.METHODS:
      raise UserError(f"unknown method {method!r}; choose from {', '.join(run.METHODS)}")
  started = time.perf_counter()
  with WorkdirLock(args.workdir, "lds", create=True):
    results = run_study(cfg, attr, args.workdir, methods)
  c, m = results["noise_ceiling"], results["noise_ceiling_seed_mean"]
  print(f"noise ceiling: one seed vs another {c['mean']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]"
        f"; for the {results['seeds']}-seed mean (Spearman-Brown) {m['mean']:+.3f} "
        f"[{m['low']:+.3f}, {m['high']:+.3f}]; "
        f"{results['subsets']} subsets x {results['seeds']} seeds, {results['num_queries']} "
        f"queries; total {time.perf_counter() - started:.0f}s")
  print(f"wrote {write_json(layout.path(args.workdir, 'results.json'), results)}")


if __name__ == "__main__":
  main()
