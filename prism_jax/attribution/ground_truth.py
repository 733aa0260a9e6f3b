"""The LDS study's ground truth: retrain on random subsets, read each query's log-probability.

For subsets S_1..S_n (each example kept with probability `fraction`) and seeds 0..R-1, a
model is trained from scratch on every (subset, seed) (`retrain.fit_group`, K at a time);
its output for query q is log p(target_q | prompt_q). Result: outputs [R, n, Q]. Every group
of K retrains is cached as soon as it is done, in WORKDIR/retrains_<hash>/, keyed by a hash
of everything that determines it (config, example rows, queries, subsets, seeds, group
size, code version), so a rerun (or a resumed run) only trains what is missing.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import time

import jax
import numpy as np

from prism_jax.attribution import common, retrain
from prism_jax.config import to_dict
from prism_jax.models import lm

VERSION = "retrain-groups/1"  # bump when the training or the read-out changes


def draw_subsets(num_subsets: int, num_examples: int, fraction: float, seed: int = 1234
                 ) -> np.ndarray:
  """[subsets, examples] bool; no subset is empty."""
  rng = np.random.default_rng(seed)
  subsets = rng.random((num_subsets, num_examples)) < fraction
  for row in subsets:
    if not row.any():
      row[rng.integers(num_examples)] = True
  return subsets


def query_batch(queries, length: int):
  """(batch [Q, L], positions [Q], targets [Q]) for reading every query at once."""
  batches = [q.batch(length) for q in queries]
  batch = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  return batch, np.array([q.position for q in queries]), np.array([q.target for q in queries])


@functools.lru_cache(maxsize=4)
def _log_probs_fn(graphdef):
  """jit(params stacked [K], batch, positions, targets) -> log-probabilities [K, Q]."""
  def one(params, batch, positions, targets):
    logp = jax.nn.log_softmax(lm.forward(graphdef, params, batch).logits, -1)
    return logp[np.arange(len(positions)), positions, targets]
  return jax.jit(jax.vmap(one, in_axes=(0, None, None, None)))


def _digest(*parts) -> str:
  h = hashlib.sha256()
  for part in parts:
    h.update(part.tobytes() if isinstance(part, np.ndarray) else
             json.dumps(part, sort_keys=True, default=str).encode())
  return h.hexdigest()[:16]


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
  return out


def settings(cfg) -> dict:
  """The config's settings that differ from the dataclass defaults: a field added later
  with a default that keeps the old behaviour leaves the key (and the cache) unchanged.
  (Changing an existing default does not: bump VERSION then.)"""
  defaults = _flat(to_dict(type(cfg)()))
  return {k: v for k, v in _flat(to_dict(cfg)).items() if k not in defaults or defaults[k] != v}


def cache_dir(workdir: str, cfg, train: common.TrainingSet, queries, subsets, seeds: int,
              group: int) -> str:
  qb, positions, targets = query_batch(queries, cfg.data.seq_len)
  key = _digest(VERSION, settings(cfg), train.rows, train.lengths, qb["inputs"], positions,
                targets, subsets, seeds, group)
  return os.path.join(workdir, f"retrains_{cfg.name}_{key}")


def _jobs(num_subsets: int, seeds: int, group: int):
  """(subset, seed) pairs in groups of `group` (the last padded by repeating its first)."""
  pairs = [(i, s) for s in range(seeds) for i in range(num_subsets)]
  out = []
  for start in range(0, len(pairs), group):
    chunk = pairs[start:start + group]
    out.append(chunk + [chunk[0]] * (group - len(chunk)))
  return out


def _read_group(path: str):
  with np.load(path) as cached:
    return np.asarray(cached["outputs"]), float(cached["seconds"])


def _read_pickle(path: str):
  with open(path, "rb") as f:
    return pickle.load(f)


def _read_cache(path: str, read, say):
  """`read(path)` of a cached result; None when absent, or (said) when it cannot be read: a
  file damaged outside this code (its writes are atomic) is computed again and replaced."""
  if not os.path.exists(path):
    return None
  try:
    return read(path)
  except Exception as e:  # noqa: BLE001 -- numpy/zip/pickle raise many types for bad bytes
    say(f"  cached {os.path.basename(path)} cannot be read ({type(e).__name__}); "
        "computing it again")
    return None


def compute(cfg, train: common.TrainingSet, queries, subsets: np.ndarray, seeds: int,
            group: int, workdir: str, say=print) -> dict:
  """{"outputs": [seeds, subsets, Q], "seconds": retraining time, "retrained": models
  trained by this call, "directory": the cache}."""
  directory = cache_dir(workdir, cfg, train, queries, subsets, seeds, group)
  os.makedirs(directory, exist_ok=True)
  graphdef, _ = lm.init(cfg, 0)
  log_probs = _log_probs_fn(graphdef)
  qb, positions, targets = query_batch(queries, cfg.data.seq_len)
  outputs = np.full((seeds, len(subsets), len(queries)), np.nan)
  jobs = _jobs(len(subsets), seeds, group)
  seconds, trained = 0.0, 0
  for g, job in enumerate(jobs):
    path = os.path.join(directory, f"group_{g:04d}.npz")
    cached = _read_cache(path, _read_group, say)
    if cached is not None:
      out_KxQ, took = cached
    else:
      started = time.perf_counter()
      params = retrain.fit_group(cfg, train, subsets[[i for i, _ in job]],
                                 [s for _, s in job], [i for i, _ in job])
      out_KxQ = np.asarray(log_probs(params, qb, positions, targets), np.float64)
      took = time.perf_counter() - started
      trained += len(job)
      _atomic_savez(path, outputs=out_KxQ, seconds=took, job=np.array(job))
      say(f"  {cfg.name}: group {g + 1}/{len(jobs)} ({len(job)} models) in {took:.0f}s")
    seconds += took
    for (i, s), out in zip(job, out_KxQ):
      outputs[s, i] = out
  return {"outputs": outputs, "seconds": seconds, "retrained": trained, "directory": directory,
          "models": len(subsets) * seeds, "seconds_per_model": seconds / (len(jobs) * group)}


def full_model(cfg, train: common.TrainingSet, seed: int, group: int, directory: str,
               say=print):
  """Params of the model trained on every example (seed `seed`), cached beside the retrains.

  Trained as a group of identical jobs so the retrains' compiled function is reused.
  """
  path = os.path.join(directory, f"full_seed{seed}.pkl")
  cached = _read_cache(path, _read_pickle, say)
  if cached is not None:
    return cached
  everything = np.ones((group, train.num_examples), bool)
  started = time.perf_counter()
  params = retrain.fit_group(cfg, train, everything, [seed] * group, [10**6] * group)
  params = jax.tree.map(lambda x: np.asarray(x[0]), jax.device_get(params))
  say(f"  {cfg.name}: full-data model in {time.perf_counter() - started:.0f}s")
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    pickle.dump(params, f)
  os.replace(tmp, path)
  return params


def _atomic_savez(path: str, **arrays) -> None:
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)
