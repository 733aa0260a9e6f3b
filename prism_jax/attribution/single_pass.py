"""`single_pass`, the default method: head influence from one forward pass and an index read.

The head's logits are z_t = E o_t with o_t = sum_k a_tk U_k (the k active prototypes' mixed
value). Both head matrices have gradients that need nothing stored per position beyond its
target y_t, its k prototype ids and activations, and its top-r softmax entries:

* **unembedding term** (the default, attr.single_pass_terms=unembedding). Through the
  logits, dL_t/dE = r_t o_t^T with r_t = p_t - e_{y_t}. With the Gauss-Newton curvature of E
  Kronecker-factored as diag(f + lambda) x I (f: how often each token is a target, the
  diagonal of E[diag p_t]; the o-side factor left at the identity, as heavy damping does),

    s_E(q, t) = [r_q^T diag(f + lambda)^-1 r_t] (o_q . o_t) kappa(q, t)^beta
              = [u . p_t - u[y_t]] (o_q . o_t) kappa(q, t)^beta,

  u = r_q / (f + lambda), and o_q . o_t = sum_k a_tk (U o_q)[i_tk]: one [M] product per
  query, then k lookups per position. kappa(q, t) in [0, 1] is the cosine between the two
  positions' stored top-r softmaxes (how alike the model's predictions, hence contexts,
  are), beta = attr.context_sharpness. Why: the head's gradient sees a context only
  through o_t and p_t, and o_t mixes a few prototypes, so every position that predicts
  the same rare token from the same prototypes scores alike; the retrains show the
  query's own context matters more than that (a passage a query was copied from moves the
  query's loss ~4x more than a typical passage). beta = 0 is the plain Gauss-Newton term;
  the LDS study chooses beta on validation and copied tuning queries together
  (docs/attribution.md).
* **values term** (attr.single_pass_terms=values; equals `influence`). dL_t/dU_j = a_tj g_t
  with g_t = E^T r_t, so for w_j = E (G_j + lambda I)^-1 g_q,

    s_U(q, t) = sum_{j in act(q) and act(t)} a_qj a_tj [w_j . p_t - w_j[y_t]].

The index keeps the r most probable entries of p_t; the rest of the mass, rho_t = 1 - sum of
those r, is spread over the other tokens like prototype j's average softmax (values term)
or like f (unembedding term) (`expected_w`; exact when r = V).

Candidates: the postings of the query's active prototypes (at most T each, best bound first,
attr.postings) and, for the unembedding term, the positions that predict the query's own
token (at most T', attr.target_postings). So a query is one [M] product (plus k solves for
the values term) and an O(k T + T') read, whatever N is. Signed (negative = opponent); an
example's score sums its positions' scores. Why the unembedding term is the default: on
the real-text LDS study it scores higher than the values term and every post-hoc baseline,
and as high as their sum, which also needs the per-prototype curvature (docs/attribution.md).

Either term is multiplied by 1 + gamma (gamma = attr.context_match) at a position whose last
16 input tokens equal the query's (`context_match.py`): the very text a query was copied
from, which the retrains say moves it most, and which the head's gradient cannot tell from
other positions predicting the same token.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from prism_jax.attribution import context_match, curvature
from prism_jax.attribution.config import AttributionConfig
from prism_jax.attribution.index import RECORD_FIELDS, Index
from prism_jax.attribution.prototype import QueryHead, Scores, document_scores
from prism_jax.models import lm

TERMS = ("unembedding", "values", "both")
TAILS = ("prototype", "uniform", "none")


@dataclasses.dataclass(frozen=True)
class HeadMatrices:
  """The head's matrices as queries use them (float64, on the host)."""
  e_VxD: np.ndarray  # E, the unembedding (the token embedding when tied)
  u_MxD: np.ndarray  # U, the prototype values

  @classmethod
  def of(cls, params) -> "HeadMatrices":
    get = lambda x: np.asarray(jax.device_get(x), np.float64)
    return cls(get(lm.unembedding(params)), get(params["prototype_head"]["values"]))


@dataclasses.dataclass(frozen=True)
class Settings:
  terms: str = "unembedding"
  damping: float = 1e-3              # values term: lambda added to each G_j
  unembedding_damping: float = 1e-3  # unembedding term: lambda in 1 / (f + lambda)
  tail: str = "prototype"
  context_sharpness: float = AttributionConfig.context_sharpness  # beta in kappa(q, t)^beta
  context_match: float = AttributionConfig.context_match  # gamma: same recent text, x(1 + gamma)

  @classmethod
  def of(cls, attr) -> "Settings":
    return cls(attr.single_pass_terms, attr.damping, attr.unembedding_damping,
               context_sharpness=attr.context_sharpness, context_match=attr.context_match)


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


def expected_w(w_V: np.ndarray, ids_NxR: np.ndarray, probs_NxR: np.ndarray, tail: str,
               prior_V: np.ndarray | None = None) -> np.ndarray:
  """w . p_t per position from its top-r softmax entries plus an estimate of the rest.

  The mass left out, rho_t = 1 - sum of the r entries, is spread over the other tokens in
  proportion to `prior_V` (tail="prototype": the prototype's own average softmax,
  Pi_j / sum Pi_j, or the target frequency f), or evenly (tail="uniform"), or dropped
  (tail="none"). Exact at r = V.
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


def _unembedding_scores(index: Index, head: QueryHead, matrices: HeadMatrices,
                        settings: Settings, records: dict) -> np.ndarray:
  """s_E(q, t) for the candidate positions `records` (module docstring)."""
  f = index.target_frequency()
  r_q = head.probs.copy()
  r_q[head.target] -= 1.0
  u = r_q / (f + settings.unembedding_damping)
  c_M = matrices.u_MxD @ head.mix  # U o_q
  act = records["top_values"].astype(np.float64)
  protos = records["top_indices"].astype(np.int64)
  overlap = np.sum(act * c_M[protos], axis=-1)  # o_t . o_q
  ids, probs = records["softmax_ids"], records["softmax_probs"]
  out = (expected_w(u, ids, probs, settings.tail, f) - u[records["target"]]) * overlap
  if settings.context_sharpness > 0:
    out *= prediction_similarity(head.probs, ids, probs) ** settings.context_sharpness
  return out


def prediction_similarity(p_q_V: np.ndarray, ids_NxR: np.ndarray, probs_NxR: np.ndarray
                          ) -> np.ndarray:
  """kappa(q, t) [N]: cosine between the query's top-r softmax and each position's stored
  top-r entries (r = the index's softmax_top; the full softmaxes at r = V), in [0, 1]."""
  r = ids_NxR.shape[-1]
  top = np.argpartition(-p_q_V, r - 1)[:r] if r < len(p_q_V) else np.arange(len(p_q_V))
  q_V = np.zeros_like(p_q_V)
  q_V[top] = p_q_V[top]
  probs = np.asarray(probs_NxR, np.float64)
  dot = np.sum(q_V[ids_NxR] * probs, axis=-1)
  norms = np.linalg.norm(q_V) * np.linalg.norm(probs, axis=-1)
  return np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 0.0)


def _scored(index: Index, head: QueryHead, matrices: HeadMatrices, settings: Settings):
  """(unique token ids, their scores, their documents)."""
  if settings.terms not in TERMS:
    raise ValueError(f"single_pass terms {settings.terms!r} is not one of {TERMS}")
  values = settings.terms in ("values", "both")
  unembedding = settings.terms in ("unembedding", "both")
  active = [(int(j), float(a)) for a, j in zip(head.top_values, head.top_indices) if a > 0]
  # Every list carries its positions' records: the read is the lists themselves.
  lists = [index.posting_records(j) for j, _ in active]
  if unembedding:
    lists.append(index.target_posting_records(head.target))
  tok = np.concatenate([l["token"] for l in lists]) if lists else np.zeros(0, np.int64)
  if not len(tok):
    return np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64)
  # A position in several lists is scored once (its copies are equal).
  unique, first, inverse = np.unique(tok, return_index=True, return_inverse=True)
  records = {field: np.concatenate([l[field] for l in lists])[first]
             for field in RECORD_FIELDS}
  records["target"] = records["target"].astype(np.int64)
  records["softmax_ids"] = records["softmax_ids"].astype(np.int64)
  total = np.zeros(len(unique))
  if unembedding:
    total += _unembedding_scores(index, head, matrices, settings, records)
  if values:
    target, ids, probs = records["target"], records["softmax_ids"], records["softmax_probs"]
    at = 0
    for (j, a_q, w), posting in zip(directions(index, head, matrices.e_VxD, settings.damping),
                                    lists):
      act = posting["activation"].astype(np.float64)
      rows = inverse[at:at + len(act)]
      at += len(act)
      prior = index.softmax_prior(j) if settings.tail == "prototype" else None
      s = a_q * act * (expected_w(w, ids[rows], probs[rows], settings.tail, prior)
                       - w[target[rows]])
      total += np.bincount(rows, weights=s, minlength=len(unique))
  total *= context_match.boost(head.context, records["context"], settings.context_match)
  return unique, total, records["document"].astype(np.int64)


def token_scores(index: Index, head: QueryHead, matrices: HeadMatrices,
                 settings: Settings = Settings()) -> tuple[np.ndarray, np.ndarray]:
  """(token ids, scores) of every candidate position."""
  tok, val, _ = _scored(index, head, matrices, settings)
  return tok, val


def score(index: Index, head: QueryHead, matrices: HeadMatrices,
          settings: Settings = Settings()) -> Scores:
  """Example (document) scores: the sum over its positions; best = its top position."""
  tok, val, ex = _scored(index, head, matrices, settings)
  return document_scores(tok, val, ex, index.num_examples)
