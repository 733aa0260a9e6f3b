"""Linear datamodeling score (LDS), its paired bootstrap, and the noise ceiling.

For query q, random training subsets S_1..S_n and the output f_q(S_i) of models retrained
on S_i (the log-probability of the query's token, averaged over R seeds):

  LDS_q = Spearman_i( sum_{e in S_i} score(q, e),  f_q(S_i) ),    LDS = mean_q LDS_q.

Intervals: a bootstrap over queries AND subsets, paired between methods: replicate b draws
one resample of the queries and one of the subsets and every method is scored on that same
draw, so a difference between two methods gets its own interval (per-replicate differences),
not two overlapping marginal ones.

Ceiling. One seed's output is y_r = f + e_r (f: the expected output over seeds, e_r: seed
noise); the target is the R-seed mean, whose reliability (share of its variance that is f)
is, by Spearman-Brown,
  rho_R = R rho_1 / (1 + (R - 1) rho_1),
with rho_1 the single-seed reliability = the correlation between two seeds' outputs over
the subsets. rho_1 is POOLED over queries: the mean over queries and seed pairs of the
seed-to-seed Spearman correlation, stepped up once (stepping up per query and averaging is
biased down by queries whose two seeds happen to disagree). No predictor p, not even f
itself, correlates with the noisy target better than
  ceiling = sqrt(rho_R),   since corr(p, f + e) = corr(p, f) * sqrt(rho_R) <= sqrt(rho_R).
(Pearson algebra applied to ranks: an approximation, as LDS uses Spearman.)
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import stats


def spearman(a: np.ndarray, b: np.ndarray) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if np.ptp(a) == 0 or np.ptp(b) == 0:
    return 0.0  # a constant prediction carries no ranking
  return float(stats.spearmanr(a, b).statistic)


def column_spearman(a_BxSxQ: np.ndarray, b_BxSxQ: np.ndarray) -> np.ndarray:
  """Spearman over axis -2 for every other index, [B, Q]; a constant column gives 0."""
  ra = stats.rankdata(a_BxSxQ, axis=-2)
  rb = stats.rankdata(b_BxSxQ, axis=-2)
  ra -= ra.mean(axis=-2, keepdims=True)
  rb -= rb.mean(axis=-2, keepdims=True)
  num = (ra * rb).sum(axis=-2)
  den = np.sqrt((ra * ra).sum(axis=-2) * (rb * rb).sum(axis=-2))
  return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def predictions(scores_QxE: np.ndarray, subsets_SxE: np.ndarray) -> np.ndarray:
  """Summed scores of each subset for each query, [S, Q]."""
  return subsets_SxE.astype(np.float64) @ np.asarray(scores_QxE, np.float64).T


def per_query(scores_QxE, subsets_SxE, outputs_SxQ) -> np.ndarray:
  pred = predictions(scores_QxE, subsets_SxE)
  return column_spearman(pred[None], np.asarray(outputs_SxQ, np.float64)[None])[0]


@dataclasses.dataclass(frozen=True)
class Resamples:
  """One bootstrap draw per row, shared by every method (that is what makes it paired)."""
  queries_BxQ: np.ndarray
  subsets_BxS: np.ndarray


def draw(num_queries: int, num_subsets: int, samples: int, seed: int = 0) -> Resamples:
  rng = np.random.default_rng(seed)
  return Resamples(rng.integers(0, num_queries, (samples, num_queries)),
                   rng.integers(0, num_subsets, (samples, num_subsets)))


def _replicates(fn, resamples: Resamples, chunk: int = 64) -> np.ndarray:
  out = []
  for start in range(0, len(resamples.queries_BxQ), chunk):
    out.append(fn(resamples.queries_BxQ[start:start + chunk],
                  resamples.subsets_BxS[start:start + chunk]))
  return np.concatenate(out)


def lds_replicates(pred_SxQ: np.ndarray, target_SxQ: np.ndarray, resamples: Resamples
                   ) -> np.ndarray:
  """LDS of each bootstrap replicate, [B]."""
  def fn(q_bxQ, s_bxS):
    pick = lambda x: x[s_bxS[:, :, None], q_bxQ[:, None, :]]  # [b, S, Q]
    return column_spearman(pick(pred_SxQ), pick(target_SxQ)).mean(axis=1)
  return _replicates(fn, resamples)


def seed_agreement(outputs_RxSxQ: np.ndarray) -> np.ndarray:
  """Per query: mean Spearman between every pair of seeds over the subsets, [Q]."""
  r = outputs_RxSxQ.shape[0]
  pairs = [(i, j) for i in range(r) for j in range(i + 1, r)]
  if not pairs:
    return np.full(outputs_RxSxQ.shape[2], np.nan)
  return np.mean([column_spearman(outputs_RxSxQ[i][None], outputs_RxSxQ[j][None])[0]
                  for i, j in pairs], axis=0)


noise_ceiling = seed_agreement  # the name earlier callers use


def spearman_brown(rho_1, seeds: int):
  rho_1 = np.asarray(rho_1, np.float64)
  return seeds * rho_1 / (1 + (seeds - 1) * rho_1)


def ceiling_from_agreement(rho_1, seeds: int):
  """sqrt(Spearman-Brown(pooled rho_1, seeds)); 0 where the seeds do not agree at all."""
  return np.sqrt(np.clip(spearman_brown(rho_1, seeds), 0.0, None))


def ceiling_replicates(outputs_RxSxQ: np.ndarray, resamples: Resamples) -> np.ndarray:
  """Pooled single-seed agreement of each bootstrap replicate, [B]."""
  r = outputs_RxSxQ.shape[0]
  pairs = [(i, j) for i in range(r) for j in range(i + 1, r)]

  def fn(q_bxQ, s_bxS):
    pick = lambda x: x[s_bxS[:, :, None], q_bxQ[:, None, :]]
    return np.mean([column_spearman(pick(outputs_RxSxQ[i]), pick(outputs_RxSxQ[j])).mean(1)
                    for i, j in pairs], axis=0)
  return _replicates(fn, resamples)


def interval(values_B: np.ndarray, level: float = 0.95) -> tuple[float, float]:
  tail = (1 - level) / 2
  return float(np.quantile(values_B, tail)), float(np.quantile(values_B, 1 - tail))


def bootstrap_interval(values_Q: np.ndarray, samples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
  """Interval of a mean over queries alone (per-query values already computed)."""
  rng = np.random.default_rng(seed)
  values_Q = np.asarray(values_Q)
  means = values_Q[rng.integers(0, len(values_Q), (samples, len(values_Q)))].mean(axis=1)
  return interval(means, level)


def compare(scores: dict[str, np.ndarray], subsets_SxE: np.ndarray, outputs_RxSxQ: np.ndarray,
            samples: int = 1000, seed: int = 0, reference: str | None = None) -> dict:
  """Every method's LDS on one paired bootstrap, its difference to `reference`, the ceiling.

  scores: method -> [Q, E]; outputs [R, S, Q] (R seeds; the target is their mean).
  """
  seeds, num_subsets, num_queries = outputs_RxSxQ.shape
  target = outputs_RxSxQ.mean(axis=0)
  resamples = draw(num_queries, num_subsets, samples, seed)
  reps, out = {}, {"methods": {}}
  for method, s in scores.items():
    pred = predictions(s, subsets_SxE)
    values = per_query(s, subsets_SxE, target)
    reps[method] = lds_replicates(pred, target, resamples)
    lo, hi = interval(reps[method])
    out["methods"][method] = {"lds": float(values.mean()), "low": lo, "high": hi,
                              "per_query": values.tolist()}
  if reference in reps:
    for method, r in reps.items():
      diff = r - reps[reference]
      point = out["methods"][method]["lds"] - out["methods"][reference]["lds"]
      lo, hi = interval(diff)
      out["methods"][method]["minus_" + reference] = {"mean": point, "low": lo, "high": hi}
  if seeds >= 2:
    rho_1 = float(np.mean(seed_agreement(outputs_RxSxQ)))
    rho_reps = ceiling_replicates(outputs_RxSxQ, resamples)
    c_reps = ceiling_from_agreement(rho_reps, seeds)
    out["ceiling"] = {
        "seed_agreement": rho_1, "seed_agreement_interval": interval(rho_reps),
        "reliability": float(spearman_brown(rho_1, seeds)), "seeds": seeds,
        "ceiling": float(ceiling_from_agreement(rho_1, seeds)),
        "low": interval(c_reps)[0], "high": interval(c_reps)[1]}
  return out


def summary(scores_QxE, subsets_SxE, outputs_RxSxQ, samples: int = 1000, seed: int = 0
            ) -> dict:
  """One method's LDS against the seed-averaged outputs, with its bootstrap interval."""
  return compare({"m": scores_QxE}, subsets_SxE, outputs_RxSxQ, samples, seed)["methods"]["m"]
