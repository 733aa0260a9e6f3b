"""Gradient dot product (TracIn with one checkpoint): score(q, e) = <grad L_q, grad L_e>.

No stored state: every query recomputes the per-example gradients of all parameters
(streamed in chunks, never all held at once).
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from prism_jax.attribution import common


@functools.lru_cache(maxsize=8)
def _fns(graphdef):
  query_grad = jax.jit(jax.grad(lambda p, b: common.summed_loss(graphdef, p, b)))

  @jax.jit
  def dots(params, batch, g_q):
    grads = common.per_example_grads(graphdef, params, batch)
    return jax.vmap(lambda g: common.tree_dot(g, g_q))(grads)

  return query_grad, dots


def score(graphdef, params, train: common.TrainingSet, query: common.Query, length: int,
          batch_size: int) -> np.ndarray:
  query_grad, dots = _fns(graphdef)
  g_q = query_grad(params, query.batch(length))
  return common.map_examples(train, batch_size, lambda b: dots(params, b, g_q)).astype(np.float64)
