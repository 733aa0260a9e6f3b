"""Linear datamodeling score (LDS): do summed attribution scores predict retrained outputs?

For query q, random training subsets S_1..S_n and the output f_q(S_i) of a model retrained
on S_i (here the log-probability of the query's token, averaged over seeds):
  LDS_q = Spearman( sum_{e in S_i} score(q, e),  f_q(S_i) )   over i
and LDS is the mean over queries. The interval resamples queries (bootstrap); the noise
ceiling is the same correlation between two retraining seeds' outputs (what a perfect
predictor of one seed's outputs could reach against another seed's).
"""

from __future__ import annotations

import numpy as np
from scipy import stats


def spearman(a: np.ndarray, b: np.ndarray) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if np.ptp(a) == 0 or np.ptp(b) == 0:
    return 0.0  # a constant prediction carries no ranking
  return float(stats.spearmanr(a, b).statistic)


def predictions(scores_QxE: np.ndarray, subsets_SxE: np.ndarray) -> np.ndarray:
  """Summed scores of each subset for each query, [S, Q]."""
  return subsets_SxE.astype(np.float64) @ np.asarray(scores_QxE, np.float64).T


def per_query(scores_QxE, subsets_SxE, outputs_SxQ) -> np.ndarray:
  pred = predictions(scores_QxE, subsets_SxE)
  return np.array([spearman(pred[:, q], outputs_SxQ[:, q]) for q in range(pred.shape[1])])


def bootstrap_interval(values_Q: np.ndarray, samples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
  rng = np.random.default_rng(seed)
  values_Q = np.asarray(values_Q)
  means = values_Q[rng.integers(0, len(values_Q), (samples, len(values_Q)))].mean(axis=1)
  tail = (1 - level) / 2
  return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def noise_ceiling(outputs_RxSxQ: np.ndarray) -> np.ndarray:
  """Per query: mean Spearman between every pair of seeds' outputs over the subsets."""
  r = outputs_RxSxQ.shape[0]
  if r < 2:
    return np.full(outputs_RxSxQ.shape[2], np.nan)
  pairs = [(i, j) for i in range(r) for j in range(i + 1, r)]
  return np.array([np.mean([spearman(outputs_RxSxQ[i, :, q], outputs_RxSxQ[j, :, q])
                            for i, j in pairs]) for q in range(outputs_RxSxQ.shape[2])])


def summary(scores_QxE, subsets_SxE, outputs_RxSxQ, samples: int = 1000, seed: int = 0
            ) -> dict:
  """LDS against the seed-averaged outputs, with its bootstrap interval."""
  values = per_query(scores_QxE, subsets_SxE, outputs_RxSxQ.mean(axis=0))
  lo, hi = bootstrap_interval(values, samples, seed)
  return {"lds": float(values.mean()), "low": lo, "high": hi, "per_query": values.tolist()}
