"""The LDS retrain study on real text: `run_study(overrides, workdir)` (the `lds` command).

What it measures. A small PRISM language model (STUDY_OVERRIDES on prism_tiny: V=1024
sentencepiece, d=64, 2 layers, 64 prototypes, k=4, seq_len 64) and its dense twin are
trained from scratch on `attr.lds_subsets` random subsets (each example kept with
probability `attr.lds_fraction`) of `attr.lds_examples` training passages of the embedded
corpus, with `attr.lds_seeds` seeds each (`ground_truth.py`, cached). The ground truth for a
query token is the retrained models' log-probability of it, averaged over seeds. Every
method in `run.METHODS` scores the queries on the model trained on all examples; a
method's damping is first chosen on `attr.lds_tuning_queries` other validation tokens from
DAMPING_GRIDS. LDS and its intervals: `lds.py` (paired bootstrap over queries and subsets;
ceiling sqrt of the pooled, Spearman-Brown stepped seed reliability).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Sequence

import numpy as np

from prism_jax import layout, outputs
from prism_jax.attribution import config as attr_config
from prism_jax.attribution import ground_truth, lds, run, text_examples
from prism_jax.config import apply_overrides
from prism_jax.errors import UserError
from prism_jax.models import lm

STUDY_OVERRIDES = (
    "model.vocab_size=1024", "model.d_model=64", "model.d_ff=176", "model.num_layers=2",
    "model.num_heads=4", "data.seq_len=64", "model.max_seq_len=64",
    "prototypes.num_prototypes=64", "prototypes.top_k=4", "data.batch_size=8",
    "train.steps=128", "optimizer.warmup_steps=16", "train.progress=false",
)

# TRAK's projection is kept below the study's example count (256); the index also keeps
# what `influence` needs (small N).
STUDY_ATTR = ("attr.trak_projection_dim=128", "attr.batch_size=32", "attr.index_influence=true",
              "attr.curvature=blocks")  # one index for every prototype method and term
# method -> (AttributionConfig field, candidate values); chosen on the tuning queries.
# (First run's grids were 1e-4..1e-1 and 1e-3..1: the choices sat on their edges; EK-FAC's
# then chose 100, the edge of 1e-2..100, so its grid reached 1000, and on a fresh machine's
# retrains it chose 1000: the grid now runs on towards its limit (infinite damping ranks
# as graddot does). single_pass's
# unembedding_damping was flat over 1e-5..1e-2, tuning LDS 0.532-0.539: its grid is now
# the context sharpness, at the default damping.)
DAMPING_GRIDS = {
    "influence": ("damping", (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)),
    "single_pass": ("context_sharpness", (0.0, 1.0, 2.0, 4.0, 8.0)),
    "trak": ("trak_damping", (1e-2, 1e-1, 1.0, 10.0, 100.0)),
    "ekfac": ("ekfac_damping", (1e-1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5)),
}
REFERENCE = "single_pass"  # the default method: every other method's LDS is compared to it
MACHINE = "2-core CPU (shared)"


def study_configs(overrides: Sequence[str] = ()):
  """(PRISM config, its dense twin, AttributionConfig) with the study's defaults."""
  import experiments

  exp, attr_items = attr_config.split_overrides(list(overrides))
  # The head the study's figures (docs/attribution.md) were measured with, pinned so they
  # and the cached retrains stay valid: prism_tiny's head since the fifth ablation round
  # (dot scores, keys at 0.02, k-means pull) has not been through the study.
  cfg = apply_overrides(experiments.get("prism_tiny"),
                        [*experiments.ROUND_ONE_HEAD, *STUDY_OVERRIDES, *exp])
  cfg = dataclasses.replace(cfg, name="lds_prism")
  attr = attr_config.apply_overrides(attr_config.AttributionConfig(),
                                     list(STUDY_ATTR) + attr_items)
  return cfg, experiments.dense_twin(cfg, "lds_dense"), attr


def describe_model(cfg) -> str:
  m = cfg.model
  head = (f"PRISM head M={cfg.prototypes.num_prototypes} k={cfg.prototypes.top_k}"
          if m.head == "prism" else "dense head")
  _, params = lm.init(cfg, 0)
  return (f"{lm.count_params(params):,} params, V={m.vocab_size} d={m.d_model} "
          f"{m.num_layers} layers, {head}, seq {cfg.data.seq_len}, {cfg.train.steps} steps "
          f"x batch {cfg.data.batch_size}")


def retrain_all(cfg, dense, attr, text, workdir: str, say=print) -> dict:
  """Ground truth of the PRISM model and (attr.lds_dense) its dense twin: {name: truth}."""
  subsets = ground_truth.draw_subsets(attr.lds_subsets, text.train.num_examples,
                                      attr.lds_fraction)
  queries = text.retrain_queries()
  out = {}
  for c in [cfg] + ([dense] if attr.lds_dense else []):
    truth = ground_truth.compute(c, text.train, queries, subsets, attr.lds_seeds,
                                 attr.lds_group, workdir, say)
    truth["subsets"] = subsets
    out[c.model.head] = truth
  return out


def _methods_for(cfg, methods: Sequence[str]) -> list[str]:
  """The methods that run on this head (the prototype methods need PRISM)."""
  if cfg.model.head == "prism":
    return list(methods)
  return [m for m in methods if m not in run.PROTOTYPE_METHODS]


def _scores(prepared, queries) -> np.ndarray:
  return np.stack([prepared.query(q).example_scores for q in queries]).astype(np.float64)


def score_method(method: str, cfg, graphdef, params, text, truth, attr, index_dir: str,
                 say=print) -> dict:
  """Reported-query scores [Q, E] of `method`, its damping chosen on the tuning queries."""
  columns = text.columns()
  nq = len(text.queries)
  # Dampings are chosen on the tuning validation tokens and the tuning copied queries
  # together: faithful on text the model never saw and on text it trained on.
  tuning_queries = text.tuning + [q for _, q in text.copied_tuning]
  mean_truth = truth["outputs"].mean(axis=0)
  tuning_truth = np.concatenate([mean_truth[:, columns["tuning"]],
                                 mean_truth[:, columns["copied_tuning"]]], axis=1)
  field, grid = DAMPING_GRIDS.get(method, (None, (None,)))
  needs_index = method in run.PROTOTYPE_METHODS
  tuning, best = {}, None
  prepare_s = 0.0
  for value in grid:
    a = attr if field is None else dataclasses.replace(attr, **{field: value})
    started = time.perf_counter()
    built = needs_index and os.path.exists(os.path.join(index_dir, "manifest.json"))
    prepared = run.prepare(method, cfg, graphdef, params, text.train, a, index_dir=index_dir,
                           build_index=not built)
    # The slowest grid value's preparation: later ones may reuse the first's index/factors.
    prepare_s = max(prepare_s, time.perf_counter() - started)
    if field is None:
      best = (value, prepared, prepare_s)
      break
    s = _scores(prepared, tuning_queries)
    tuning[value] = float(lds.per_query(s, truth["subsets"], tuning_truth).mean())
    say(f"    {cfg.name} {method} {field}={value:g}: tuning LDS {tuning[value]:+.3f}")
    if best is None or tuning[value] > tuning[best[0]]:
      best = (value, prepared, prepare_s)
  value, prepared, _ = best
  started = time.perf_counter()
  scores = _scores(prepared, text.queries)
  query_s = (time.perf_counter() - started) / nq
  return {"scores": scores, "damping_field": field, "damping": value,
          "tuning_lds": {f"{k:g}": v for k, v in tuning.items()},
          "prepare_seconds": prepare_s, "query_seconds": query_s,
          "stored_bytes": int(prepared.stored_bytes),
          "copied": copied_ranks(prepared, text.copied)}


def _rank_summary(ranks) -> dict:
  ranks = np.asarray(ranks)
  return {"top1": float(np.mean(ranks == 0)) if len(ranks) else None,
          "top5": float(np.mean(ranks < 5)) if len(ranks) else None, "queries": len(ranks)}


def copied_ranks(prepared, copied) -> dict:
  """How often a query cut from a training passage ranks that passage first (and in the
  top 5): {top1, top5, queries}; ties count against the passage."""
  ranks = []
  for example, query in copied:
    s = prepared.query(query).example_scores
    ranks.append(int(np.sum(s >= s[example])) - 1)
  return _rank_summary(ranks)


def copied_truth(truth, subsets_SxE: np.ndarray, copied, offset: int) -> dict:
  """The retrains' own answer for the copied queries: rank of each query's passage by its
  measured effect, mean output (seed-averaged) of the subsets that hold the passage minus
  that of the subsets that do not (the difference-in-means datamodel), among all passages.
  The measured ceiling for "own passage first" at this study's size and noise."""
  outputs_SxC = truth["outputs"][:, :, offset:offset + len(copied)].mean(axis=0)
  held = subsets_SxE.astype(np.float64)
  count_in = held.sum(0)
  count_out = len(held) - count_in
  mean_in = held.T @ outputs_SxC / np.maximum(count_in, 1)[:, None]
  mean_out = (1 - held).T @ outputs_SxC / np.maximum(count_out, 1)[:, None]
  effect_ExC = np.where(((count_in > 0) & (count_out > 0))[:, None], mean_in - mean_out, 0.0)
  ranks = [int(np.sum(effect_ExC[:, c] >= effect_ExC[e, c])) - 1
           for c, (e, _) in enumerate(copied)]
  return _rank_summary(ranks)


def score_model(cfg, params, text, truth, attr, methods, workdir: str, say=print) -> dict:
  """LDS of every method on one model (paired bootstrap, ceiling)."""
  graphdef, _ = lm.init(cfg, 0)
  index_dir = os.path.join(workdir, f"index_{cfg.name}")
  if os.path.exists(os.path.join(index_dir, "manifest.json")):
    import shutil
    shutil.rmtree(index_dir)  # built from this run's full-data model, never a stale one
  per_method, scores = {}, {}
  for method in _methods_for(cfg, methods):
    started = time.perf_counter()
    result = score_method(method, cfg, graphdef, params, text, truth, attr, index_dir, say)
    scores[method] = result.pop("scores")
    per_method[method] = result
    say(f"  {cfg.name} {method}: scored in {time.perf_counter() - started:.0f}s")
  # Raw scores beside the results, so another table can be computed without rescoring.
  outputs.write_npz(os.path.join(workdir, f"scores_{cfg.name}.npz"), scores)
  nq = len(text.queries)
  reported = truth["outputs"][:, :, :nq]
  stats = lds.compare(scores, truth["subsets"], reported, attr.lds_bootstrap,
                      reference=REFERENCE)
  for method, extra in per_method.items():
    stats["methods"][method].update(extra)
  stats["copied_truth"] = copied_truth(truth, truth["subsets"], text.copied,
                                       text.columns()["copied"].start)
  return stats


def check_arguments(overrides: Sequence[str], methods: Sequence[str]):
  """(PRISM config, dense twin, AttributionConfig), or a one-line UserError before any
  retraining."""
  if not methods:  # `--methods ""` would retrain every model for nothing to score
    raise UserError(f"no method given; choose from {', '.join(run.METHODS)}")
  for method in methods:
    if method not in run.METHODS:
      raise UserError(f"unknown method {method!r}; choose from {', '.join(run.METHODS)}")
  cfg, dense, attr = study_configs(overrides)
  if attr.lds_examples < 2 * attr.trak_projection_dim and "trak" in methods:
    raise UserError(f"attr.trak_projection_dim={attr.trak_projection_dim} must stay below "
                    f"half of attr.lds_examples={attr.lds_examples} (the subsets' size)")
  return cfg, dense, attr


def run_study(overrides: Sequence[str] = (), workdir: str = "runs/lds",
              methods: Sequence[str] | None = None, say=print, text=None) -> dict:
  """The whole study; writes WORKDIR/results.{json,md} and returns the results.

  overrides: `key=value` (the study's model) and `attr.key=value` (study size, dampings).
  methods: default every method in run.METHODS. text: a `text_examples.StudyText` to use
  instead of the embedded corpus (the tests' reduced mode).
  """
  methods = tuple(run.METHODS if methods is None else methods)
  cfg, dense, attr = check_arguments(overrides, methods)
  started = time.perf_counter()
  text = text or text_examples.load(cfg, attr)
  truths = retrain_all(cfg, dense, attr, text, workdir, say)
  results = {"setup": _setup(cfg, dense, attr, text, truths), "models": {}}
  for c in [cfg] + ([dense] if attr.lds_dense else []):
    truth = truths[c.model.head]
    params = ground_truth.full_model(c, text.train, 0, attr.lds_group, truth["directory"], say)
    results["models"][c.model.head] = score_model(c, params, text, truth, attr, methods,
                                                  workdir, say)
    results["models"][c.model.head]["description"] = describe_model(c)
  results["seconds_total"] = time.perf_counter() - started
  outputs.write_text(layout.path(workdir, "results.json"),
                     json.dumps(results, indent=1, default=float))
  outputs.write_text(layout.path(workdir, "results.md"), format_table(results) + "\n")
  return results


def _setup(cfg, dense, attr, text, truths) -> dict:
  return {
      "data": text.source, "examples": text.train.num_examples,
      "example_tokens": int(text.train.num_tokens()), "queries": len(text.queries),
      "tuning_queries": len(text.tuning), "copied_queries": len(text.copied),
      "copied_tuning_queries": len(text.copied_tuning),
      "subsets": attr.lds_subsets,
      "fraction": attr.lds_fraction, "seeds": attr.lds_seeds, "machine": MACHINE,
      "bootstrap": attr.lds_bootstrap,
      "retrain": {head: {"models": t["models"], "seconds": t["seconds"],
                         "seconds_per_model": t["seconds_per_model"],
                         "retrained_now": t["retrained"], "cache": t["directory"]}
                  for head, t in truths.items()},
  }


def _ci(d: dict, key: str = "lds") -> str:
  return f"{d[key]:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def format_table(results: dict) -> str:
  """The study's markdown table, with what it was measured on."""
  s = results["setup"]
  lines = [f"LDS on real text: {s['examples']} training passages ({s['example_tokens']:,} "
           f"scored tokens) of {s['data']}; {s['queries']} validation query tokens "
           f"(+{s['tuning_queries']} other ones and {s.get('copied_tuning_queries', 0)} "
           f"copied ones for choosing dampings); {s['subsets']} random "
           f"subsets (fraction {s['fraction']:g}) x {s['seeds']} seeds; paired bootstrap "
           f"({s['bootstrap']} draws over queries and subsets, 95%); {s['machine']}. "
           f"Copied: {s.get('copied_queries', 0)} queries cut from training passages at a "
           "random position; how often the method ranks the passage first (top 5), and "
           "how often the retrains themselves do (the passage's measured effect: mean "
           "output of the subsets holding it minus the rest).", ""]
  for head, r in s["retrain"].items():
    lines.append(f"- retrains ({head}): {r['models']} models, {r['seconds']:.0f}s "
                 f"({r['seconds_per_model']:.1f}s per model, trained K at a time)")
  lines.append("")
  lines.append("| model | method | damping (chosen) | LDS [95%] | minus " + REFERENCE
               + " [95%] | copied: own passage 1st (top 5) | prepare s | query ms |")
  lines.append("|---|---|---|---|---|---|---|---|")
  for head, m in results["models"].items():
    for method, r in m["methods"].items():
      damp = "-" if r.get("damping_field") is None else f"{r['damping_field']}={r['damping']:g}"
      diff = r.get("minus_" + REFERENCE)
      diff = "-" if diff is None or method == REFERENCE else _ci(diff, "mean")
      copied = r.get("copied") or {}
      copied = ("-" if copied.get("top1") is None
                else f"{copied['top1']:.2f} ({copied['top5']:.2f})")
      lines.append(f"| {head} | {method} | {damp} | {_ci(r)} | {diff} | {copied} | "
                   f"{r['prepare_seconds']:.1f} | {r['query_seconds'] * 1e3:.1f} |")
    c = m.get("ceiling")
    truth = m.get("copied_truth") or {}
    copied = ("-" if truth.get("top1") is None
              else f"{truth['top1']:.2f} ({truth['top5']:.2f})")
    if c:
      lines.append(f"| {head} | ceiling sqrt(rho_{c['seeds']}); copied: the retrains' own "
                   f"ranking | - | {_ci(c, 'ceiling')} | - | {copied} | - | - |")
  lines.append("")
  for head, m in results["models"].items():
    c = m.get("ceiling")
    lines.append(f"- {head}: {m['description']}"
                 + (f"; seed agreement rho_1 {c['seed_agreement']:+.3f} (pooled over queries), "
                    f"reliability of the {c['seeds']}-seed mean {c['reliability']:.3f}"
                    if c else ""))
  return "\n".join(lines)
