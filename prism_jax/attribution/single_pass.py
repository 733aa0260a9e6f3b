"""`single_pass`, the default method: head influence from one forward pass and an index read.

The logits are linear in the prototype values U and dL_t/dU_j = a_tj g_t with
g_t = E^T (p_t - e_{y_t}). So for w_j = E (G_j + lambda I)^-1 g_q,

  g_q^T (G_j + lambda I)^-1 g_t = w_j . p_t - w_j[y_t],

and the influence score of position t on the query q (influence.py) is

  s(q, t) = sum_{j in act(q) and act(t)} a_qj a_tj [w_j . p_t - w_j[y_t]]

which needs, per position, only its target and its softmax: no stored g_t. The index keeps
the r most probable entries of p_t; the rest of the mass, rho_t = 1 - sum of those r, is
spread over the other tokens like prototype j's average softmax (`expected_w`; exact when
r = V).
Postings are read best bound first, at most T per prototype (attr.postings), so a query is
k solves with stored eigendecompositions plus an O(k T) read, whatever N is. Signed
(negative = opponent); an example's score sums its positions' scores.
"""

from __future__ import annotations

import numpy as np

from prism_jax.attribution import curvature
from prism_jax.attribution.index import Index
from prism_jax.attribution.prototype import QueryHead, Scores, document_scores


def directions(index: Index, head: QueryHead, e_VxD: np.ndarray, damping: float
               ) -> list[tuple[int, float, np.ndarray]]:
  """[(j, a_qj, w_j [V])] for the query's active prototypes."""
  out = []
  for a_q, j in zip(head.top_values, head.top_indices):
    if a_q <= 0:
      continue
    v = curvature.solve(*index.curvature_eigen(int(j)), head.grad, damping)
    out.append((int(j), float(a_q), e_VxD @ v))
  return out


TAILS = ("prototype", "uniform", "none")


def expected_w(w_V: np.ndarray, ids_NxR: np.ndarray, probs_NxR: np.ndarray, tail: str,
               prior_V: np.ndarray | None = None) -> np.ndarray:
  """w . p_t per position from its top-r softmax entries plus an estimate of the rest.

  The mass left out, rho_t = 1 - sum of the r entries, is spread over the other tokens in
  proportion to `prior_V` (tail="prototype": the prototype's own average softmax,
  Pi_j / sum Pi_j), or evenly (tail="uniform"), or dropped (tail="none"). Exact at r = V.
  """
  probs = np.asarray(probs_NxR, np.float64)
  w_top = w_V[ids_NxR]
  out = np.sum(w_top * probs, axis=-1)
  if tail == "none" or ids_NxR.shape[-1] >= len(w_V):
    return out
  mass = np.clip(1.0 - probs.sum(-1), 0.0, 1.0)
  prior = np.ones(len(w_V)) if tail == "uniform" or prior_V is None else prior_V
  prior = np.asarray(prior, np.float64)
  weight_rest = prior.sum() - prior[ids_NxR].sum(-1)
  w_rest = (w_V @ prior) - np.sum(w_top * prior[ids_NxR], axis=-1)
  return out + mass * np.where(weight_rest > 1e-30, w_rest / np.maximum(weight_rest, 1e-30),
                               0.0)


def token_scores(index: Index, head: QueryHead, e_VxD: np.ndarray, damping: float,
                 tail: str = "prototype") -> tuple[np.ndarray, np.ndarray]:
  """(token ids, scores) of every posting of the query's active prototypes."""
  tok, val, _ = _scored(index, head, e_VxD, damping, tail)
  return tok, val


def _scored(index, head, e_VxD, damping, tail):
  """(unique token ids, their scores, their documents)."""
  per_proto = [(a_q, w, *index.postings(j), j) for j, a_q, w in
               directions(index, head, e_VxD, damping)]
  per_proto = [x for x in per_proto if len(x[2])]
  if not per_proto:
    return np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64)
  tok = np.concatenate([x[2] for x in per_proto])
  # Each position read once (sorted, so the reads follow the files), for all k lists.
  unique, inverse = np.unique(tok, return_inverse=True)
  target = index.gather("target", unique).astype(np.int64)[inverse]
  ids = index.gather("softmax_ids", unique).astype(np.int64)[inverse]
  probs = index.gather("softmax_probs", unique)[inverse]
  vals, at = [], 0
  for a_q, w, t, act, j in per_proto:
    sl = slice(at, at + len(t))
    at += len(t)
    prior = index.softmax_prior(j) if tail == "prototype" else None
    vals.append(a_q * act * (expected_w(w, ids[sl], probs[sl], tail, prior) - w[target[sl]]))
  document = index.gather("document", unique).astype(np.int64)
  return unique, np.bincount(inverse, weights=np.concatenate(vals)), document


def score(index: Index, head: QueryHead, e_VxD: np.ndarray, damping: float,
          tail: str = "prototype") -> Scores:
  """Example (document) scores: the sum over its positions; best_token = its top position."""
  tok, val, ex = _scored(index, head, e_VxD, damping, tail)
  return document_scores(tok, val, ex, index.num_examples)
