"""Prototype influence: an influence function restricted to the prototype head's values U.

The logits are linear in U: z = E (sum_j a_j U_j), so a position's loss gradient touches
only the rows of its k active prototypes, dL_t/dU_j = a_tj g_t with g_t = E^T (p_t - e_y).
The damped Gauss-Newton curvature of U is therefore block-sparse by prototype; we keep its
per-prototype diagonal blocks G_j (D x D, curvature.py; exact when k = 1, and otherwise the
cross terms of co-active prototypes are dropped), so the inverse-Hessian-vector product is
k independent D x D solves (with the index's stored eigendecompositions):

  score(q, t) = sum_{j in act(q) & act(t)} a_qj a_tj g_q^T (G_j + damping I)^{-1} g_t

Only positions in the posting lists of the query's active prototypes are scored. An
example's score is the sum over its positions (its loss is their sum). Positive: training
on the example lowers the query's loss. It reads every posting and a stored g_t [N, D]
(float32): fine at small N, 4 D bytes per token does not scale (`single_pass` computes the
same scores without g_t).
"""

from __future__ import annotations

import numpy as np

from prism_jax.attribution import curvature
from prism_jax.attribution.index import Index
from prism_jax.attribution.prototype import QueryHead, Scores, document_scores


def preconditioned(index: Index, head: QueryHead, damping: float) -> list[tuple[int, np.ndarray]]:
  """[(prototype j, a_qj (G_j + damping I)^{-1} g_q)] for the query's active prototypes."""
  out = []
  for a_q, j in zip(head.top_values, head.top_indices):
    if a_q <= 0:
      continue
    out.append((int(j), a_q * curvature.solve(*index.curvature_eigen(int(j)), head.grad,
                                                damping)))
  return out


def token_scores(index: Index, head: QueryHead, damping: float) -> tuple[np.ndarray, np.ndarray]:
  """(token ids, scores) of every position sharing an active prototype with the query."""
  index.require_influence()
  toks, vals = [], []
  for j, v in preconditioned(index, head, damping):
    tok, act = index.all_postings(j)
    toks.append(tok)
    vals.append(act * (np.asarray(index.gather("grad", tok), np.float64) @ v))
  if not toks:
    return np.zeros(0, np.int64), np.zeros(0)
  tok, val = np.concatenate(toks), np.concatenate(vals)
  unique, inverse = np.unique(tok, return_inverse=True)
  return unique, np.bincount(inverse, weights=val)


def score(index: Index, head: QueryHead, damping: float) -> Scores:
  tok, val = token_scores(index, head, damping)
  ex = index.gather("document", tok).astype(np.int64)
  return document_scores(tok, val, ex, index.num_examples)
