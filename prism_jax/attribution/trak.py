"""TRAK-style scores: random projections of per-example gradients, Gauss-Newton inverse.

  phi_e = R^T grad L_e              R: Gaussian [P, dim] / sqrt(dim), never materialised
  K     = Phi^T Phi / E + lambda I  Gauss-Newton (outer products of gradients) in the
                                    projected space, lambda = trak_damping * mean diag
  score(q, e) = phi_q^T K^{-1} phi_e, averaged over an ensemble of independent projections

R is generated on the fly, block by block: parameter leaf i, rows [c*C, (c+1)*C) of its
flattened gradient meet the Gaussian block drawn from fold_in(fold_in(key(seed), i), c)
inside a `lax.scan` over blocks, so at most one [C, dim] block (C = BLOCK_ROWS) exists at a
time, whatever the parameter count: at 1.6B parameters and dim 4096 a dense R would be
~26 TB; here it is 16 MB. Same seed, same R (queries and examples meet the same matrix).
`dim` should stay below the number of examples (else K is a rank-deficient sample).

Stored state: Phi [ensemble, E, dim] and K^{-1} [ensemble, dim, dim] (float32); `dim` sizes
it, which is how the benchmark matches the prototype index's bytes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from prism_jax.attribution import common

BLOCK_ROWS = 1024  # rows of R alive at once, per leaf


@dataclasses.dataclass(frozen=True)
class Projection:
  """Which random matrices: one per seed (an ensemble when several). Hashable: jit-static."""
  dim: int
  seeds: tuple[int, ...]
  block_rows: int = BLOCK_ROWS


def projection(params, dim: int, seed: int, ensemble: int = 1) -> Projection:
  del params  # R depends only on the leaves' sizes, read when projecting
  return Projection(dim, tuple(seed + i for i in range(ensemble)))


def block(seed: int, leaf: int, index, rows: int, dim: int) -> jax.Array:
  """Rows [index*rows, (index+1)*rows) of leaf `leaf`'s part of R, [rows, dim]."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), leaf), index)
  return jax.random.normal(key, (rows, dim), jnp.float32) / np.sqrt(dim)


def project(flat_grads_BxP: list, seed: int, dim: int, rows: int) -> jax.Array:
  """sum over leaves of g_leaf [B, n] @ R_leaf [n, dim], one [rows, dim] block at a time."""
  out = 0.0
  for leaf, g in enumerate(flat_grads_BxP):
    n = g.shape[1]
    blocks = -(-n // rows)
    g = jnp.pad(g.astype(jnp.float32), ((0, 0), (0, blocks * rows - n)))
    g = g.reshape(g.shape[0], blocks, rows).transpose(1, 0, 2)  # [blocks, B, rows]

    def body(acc, item, leaf=leaf):
      index, g_block = item
      return acc + g_block @ block(seed, leaf, index, rows, dim), None

    acc0 = jnp.zeros((g.shape[1], dim), jnp.float32)
    acc, _ = jax.lax.scan(body, acc0, (jnp.arange(blocks), g))
    out = out + acc
  return out


def _flat(grads, batched: bool) -> list:
  return [g.reshape(g.shape[0], -1) if batched else g.reshape(1, -1)
          for g in jax.tree.leaves(grads)]


@functools.lru_cache(maxsize=8)
def _fns(graphdef, proj: Projection):
  def features(flat):
    return jnp.stack([project(flat, s, proj.dim, proj.block_rows) for s in proj.seeds])

  @jax.jit
  def example_features(params, batch):  # [ensemble, B, dim]
    return features(_flat(common.per_example_grads(graphdef, params, batch), True))

  @jax.jit
  def query_features(params, batch):  # [ensemble, dim]
    g = jax.grad(lambda p: common.summed_loss(graphdef, p, batch))(params)
    return features(_flat(g, False))[:, 0]

  return example_features, query_features


@dataclasses.dataclass
class TrakState:
  features: np.ndarray  # [ensemble, E, dim] float32
  inverse: np.ndarray   # [ensemble, dim, dim] float32

  @property
  def nbytes(self) -> int:
    return int(self.features.nbytes + self.inverse.nbytes)


def prepare(graphdef, params, train: common.TrainingSet, proj: Projection, damping: float,
            batch_size: int) -> TrakState:
  example_features, _ = _fns(graphdef, proj)
  phi = np.concatenate([np.asarray(example_features(params, train.batch(i, pad_to=batch_size))
                                   )[:, :len(i)]
                        for i in common.chunks(train.num_examples, batch_size)], axis=1)
  inverses = []
  for member in phi.astype(np.float64):
    gn = member.T @ member / max(len(member), 1)
    lam = damping * max(float(np.mean(np.diag(gn))), 1e-30)
    inverses.append(np.linalg.inv(gn + lam * np.eye(gn.shape[0])))
  return TrakState(phi.astype(np.float32), np.stack(inverses).astype(np.float32))


def score(state: TrakState, graphdef, params, proj: Projection, query: common.Query,
          length: int) -> np.ndarray:
  _, query_features = _fns(graphdef, proj)
  phi_q = np.asarray(query_features(params, query.batch(length)), np.float64)  # [ens, dim]
  per_member = np.einsum("ned,nd->ne", state.features.astype(np.float64),
                         np.einsum("nij,nj->ni", state.inverse.astype(np.float64), phi_q))
  return per_member.mean(axis=0)


def dim_for_bytes(target_bytes: int, num_examples: int, ensemble: int = 1) -> int:
  """Largest projection size whose state (ensemble * (E*dim + dim^2) floats) fits."""
  floats = target_bytes / 4 / ensemble
  dim = int((-num_examples + np.sqrt(num_examples**2 + 4 * floats)) / 2)
  return max(dim, 1)
