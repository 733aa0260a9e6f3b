"""TRAK-style scores: random projections of per-example gradients, Gauss-Newton inverse.

  phi_e = R^T grad L_e              R: Gaussian [P, dim] / sqrt(dim), regenerated from a seed
  K     = Phi^T Phi / E + lambda I  Gauss-Newton (outer products of gradients) in the
                                    projected space, lambda = trak_damping * mean diag
  score(q, e) = phi_q^T K^{-1} phi_e

Stored state: Phi [E, dim] and K^{-1} [dim, dim] (float32); `dim` sizes it, which is how the
benchmark matches the prototype index's bytes. Single model, no ensembling.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from prism_jax.attribution import common


@dataclasses.dataclass
class TrakState:
  features: np.ndarray  # [E, dim] float32
  inverse: np.ndarray   # [dim, dim] float32

  @property
  def nbytes(self) -> int:
    return int(self.features.nbytes + self.inverse.nbytes)


def projection(params, dim: int, seed: int):
  """One Gaussian block per parameter leaf, [leaf size, dim]."""
  leaves, treedef = jax.tree.flatten(params)
  key = jax.random.key(seed)
  blocks = [jax.random.normal(jax.random.fold_in(key, i), (leaf.size, dim), jnp.float32)
            / np.sqrt(dim) for i, leaf in enumerate(leaves)]
  return jax.tree.unflatten(treedef, blocks)


def _project(grads, proj, batched: bool):
  out = 0.0
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(proj)):
    flat = g.reshape(g.shape[0], -1) if batched else g.reshape(1, -1)
    out = out + flat.astype(jnp.float32) @ r
  return out


@functools.lru_cache(maxsize=8)
def _fns(graphdef):
  @jax.jit
  def example_features(params, batch, proj):
    return _project(common.per_example_grads(graphdef, params, batch), proj, True)

  @jax.jit
  def query_features(params, batch, proj):
    g = jax.grad(lambda p: common.summed_loss(graphdef, p, batch))(params)
    return _project(g, proj, False)[0]

  return example_features, query_features


def prepare(graphdef, params, train: common.TrainingSet, proj, damping: float,
            batch_size: int) -> TrakState:
  example_features, _ = _fns(graphdef)
  phi = common.map_examples(train, batch_size, lambda b: example_features(params, b, proj))
  phi64 = phi.astype(np.float64)
  gn = phi64.T @ phi64 / max(len(phi64), 1)
  lam = damping * max(float(np.mean(np.diag(gn))), 1e-30)
  inverse = np.linalg.inv(gn + lam * np.eye(gn.shape[0]))
  return TrakState(phi.astype(np.float32), inverse.astype(np.float32))


def score(state: TrakState, graphdef, params, proj, query: common.Query, length: int
          ) -> np.ndarray:
  _, query_features = _fns(graphdef)
  phi_q = np.asarray(query_features(params, query.batch(length), proj), np.float64)
  return state.features.astype(np.float64) @ (state.inverse.astype(np.float64) @ phi_q)


def dim_for_bytes(target_bytes: int, num_examples: int) -> int:
  """Largest projection size whose state (E*dim + dim^2 floats) fits in target_bytes."""
  floats = target_bytes / 4
  dim = int((-num_examples + np.sqrt(num_examples**2 + 4 * floats)) / 2)
  return max(dim, 1)
