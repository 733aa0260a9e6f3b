"""Prototype attribution: one forward pass, the token's prototype slices x their neighbourhoods.

For a query predicting y, the head gives c_j(y) = a_qj <U_j, E_y> for its k active
prototypes (summing to the logit z_y). The prototypes that drive the token are those with
c_j(y) > 0; each indexed neighbour t of such a prototype receives
  c_j(y) * nu_j(q, t),   nu_j(q, t) = min(a_qj, a_tj) / max(a_qj, a_tj)  in [0, 1],
the share of prototype j's evidence it carries: 1 when its activation of j matches the
query's, less the further apart they are. A position whose code equals the query's gets
the most any position can, sum_j max(c_j(y), 0), so a query copied from a training example
finds that example first whenever its position is in the stored neighbourhoods
(prototypes pushing against the token, c_j < 0, credit no one). An example's score is its best position's score. No backward
pass; the work per query is O(k * neighbourhood_size), independent of the training size.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from prism_jax.attribution import context_match
from prism_jax.attribution.common import Query
from prism_jax.attribution.index import Index
from prism_jax.models import lm, prism_head


@dataclasses.dataclass
class QueryHead:
  """The prototype head at the query position."""
  top_values: np.ndarray     # [k]
  top_indices: np.ndarray    # [k]
  contributions: np.ndarray  # [k] c_j(y)
  grad: np.ndarray           # [D] g_q = E^T (p - e_y)
  log_prob: float
  probs: np.ndarray | None = None  # [V] p_q, the softmax
  mix: np.ndarray | None = None    # [D] o_q = sum_k a_qk U_k, the mixed value (logits o_q E^T)
  target: int = -1
  context: int | None = None  # fingerprint of the prompt's last tokens (context_match.py)


@dataclasses.dataclass
class Scores:
  """Example-level scores over an index's examples, plus the position behind each.

  Stored sparse: the examples with a scored position (`ids`, ascending), their scores and
  best positions; every other example scores 0 with no position (-1). A query then costs
  what it scored, not the number of documents: two dense [E] arrays are 800 MB per query
  at 5e7 documents. `example_scores` / `best_token` give the dense view where one is wanted
  (the LDS study); `top` ranks without it.
  """
  ids: np.ndarray     # [n] example ids, ascending, unique
  values: np.ndarray  # [n] their scores
  best: np.ndarray    # [n] index row of each one's best position, -1 if none
  num_examples: int

  @classmethod
  def empty(cls, num_examples: int) -> "Scores":
    return cls(np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64), num_examples)

  @classmethod
  def from_dense(cls, scores_E: np.ndarray, best_E: np.ndarray | None = None) -> "Scores":
    scores_E = np.asarray(scores_E)
    best_E = np.full(len(scores_E), -1, np.int64) if best_E is None else np.asarray(best_E)
    return cls(np.arange(len(scores_E)), scores_E, best_E, len(scores_E))

  @property
  def example_scores(self) -> np.ndarray:
    """[E], 0 for an example with no scored position."""
    dense = np.zeros(self.num_examples, np.result_type(self.values, np.float64))
    dense[self.ids] = self.values
    return dense

  @property
  def best_token(self) -> np.ndarray:
    """[E] index row behind each example's score, -1 if none."""
    dense = np.full(self.num_examples, -1, np.int64)
    dense[self.ids] = self.best
    return dense

  def _lookup(self, examples: np.ndarray, table: np.ndarray, missing):
    examples = np.asarray(examples, np.int64)
    if not len(self.ids):
      return np.full(len(examples), missing, table.dtype)
    at = np.minimum(np.searchsorted(self.ids, examples), len(self.ids) - 1)
    return np.where(self.ids[at] == examples, table[at], missing)

  def score_of(self, examples: np.ndarray) -> np.ndarray:
    return self._lookup(examples, self.values, 0.0)

  def best_of(self, examples: np.ndarray) -> np.ndarray:
    return self._lookup(examples, self.best, -1)

  def top(self, k: int) -> np.ndarray:
    """The k highest-scoring example ids, ties broken by example order: the same as
    `common.top_examples(self.example_scores, k)`, without the [E] arrays."""
    values = np.asarray(self.values, np.float64)
    ranked = lambda sel: self.ids[sel][np.lexsort((self.ids[sel], -values[sel]))]
    positive, negative = ranked(values > 0), ranked(values < 0)
    zeros_needed = min(max(k - len(positive), 0), self.num_examples)
    # The first examples in id order whose score is 0 (listed at 0, or not listed at all).
    nonzero = self.ids[values != 0]
    candidates = np.arange(min(self.num_examples, zeros_needed + len(nonzero)))
    zeros = candidates[~np.isin(candidates, nonzero)][:zeros_needed]
    return np.concatenate([positive, zeros, negative]).astype(np.int64)[:k]


def document_scores(tok: np.ndarray, val: np.ndarray, ex: np.ndarray, num_examples: int
                    ) -> Scores:
  """Position scores summed per document (its loss is their sum); best = the document's
  highest-scoring position."""
  if not len(tok):
    return Scores.empty(num_examples)
  order = np.lexsort((val, ex))
  last = np.r_[ex[order][1:] != ex[order][:-1], True]
  ids = ex[order][last]
  # Summed in the positions' own order (bincount over the compact ids).
  sums = np.bincount(np.searchsorted(ids, ex), weights=val, minlength=len(ids))
  return Scores(ids.astype(np.int64), sums, tok[order][last].astype(np.int64), num_examples)


@functools.lru_cache(maxsize=8)
def _head_fn(graphdef):
  def fn(params, batch, position, target):
    out = lm.forward(graphdef, params, batch)
    protos = out.prototypes
    e_VxD = lm.unembedding(params).astype(jnp.float32)
    values = params["prototype_head"]["values"]
    c = prism_head.prototype_contributions(protos.top_values, protos.top_indices, values, e_VxD,
                                           batch["targets"])
    logp = jax.nn.log_softmax(out.logits[0, position])
    p = jnp.exp(logp)
    g = p @ e_VxD - e_VxD[target]
    top_values, top_indices = protos.top_values[0, position], protos.top_indices[0, position]
    mix = top_values.astype(jnp.float32) @ values.astype(jnp.float32)[top_indices]
    return top_values, top_indices, c[0, position], g, logp[target], p, mix
  return jax.jit(fn)


def query_head(graphdef, params, query: Query, length: int) -> QueryHead:
  values, indices, contrib, grad, logp, probs, mix = jax.device_get(
      _head_fn(graphdef)(params, query.batch(length), query.position, query.target))
  return QueryHead(np.asarray(values), np.asarray(indices), np.asarray(contrib),
                   np.asarray(grad, np.float64), float(logp), np.asarray(probs, np.float64),
                   np.asarray(mix, np.float64), int(query.target),
                   context_match.of_prompt(query.prompt))


def token_scores(index: Index, head: QueryHead) -> tuple[np.ndarray, np.ndarray]:
  """(token ids, scores) of every neighbour of the query's active prototypes."""
  toks, vals = [], []
  for a_q, j, c in zip(head.top_values, head.top_indices, head.contributions):
    if a_q <= 0 or c <= 0:
      continue
    tok, act = index.neighbours(int(j))
    act = act.astype(np.float64)
    nu = np.minimum(act, a_q) / np.maximum(np.maximum(act, a_q), 1e-30)
    toks.append(tok)
    vals.append(c * nu)
  if not toks:
    return np.zeros(0, np.int64), np.zeros(0)
  tok, val = np.concatenate(toks), np.concatenate(vals).astype(np.float64)
  unique, inverse = np.unique(tok, return_inverse=True)
  return unique, np.bincount(inverse, weights=val)


def score(index: Index, head: QueryHead) -> Scores:
  tok, val = token_scores(index, head)
  if not len(tok):
    return Scores.empty(index.num_examples)
  ex = index.gather("document", tok).astype(np.int64)
  # Best position per example: sort by (example, score) and keep each example's last.
  order = np.lexsort((val, ex))
  chosen = order[np.r_[ex[order][1:] != ex[order][:-1], True]]
  return Scores(ex[chosen], val[chosen], tok[chosen].astype(np.int64), index.num_examples)
