"""The PRISM prototype head: next-token logits as a sparse, non-negative prototype mixture.

For the backbone's final hidden state h (size D) at each position:

  s_j   = sim(h, P_j) / tau                      prototype keys P [M, D], tau learned
  a     = top_k(relu(s))                          at most k non-zero, all >= 0
  z     = (sum_j a_j U_j) E^T                     prototype values U [M, D], unembedding E
  c_j(y)= a_j <U_j, E_y>,   sum_j c_j(y) == z_y  (no bias: the identity is exact)

The maths are pure functions so that evaluation, attribution and control reuse them
unchanged; `PrototypeHead` only owns the parameters. The bank (M) is sharded over the
mesh axis that `prototypes` maps to; top-k runs per shard and the k-per-shard candidates are
merged, as in expert routing.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import nnx, struct

from prism_jax import sharding
from prism_jax.config import ModelConfig, PrototypeConfig

_NEG_SQ_EPS = 1e-4


@struct.dataclass
class PrototypeOutput:
  """Everything the head computed for a batch; shapes [B, L, ...]."""
  scores: jax.Array       # [B, L, M] similarity / tau, before relu and top-k
  distances: jax.Array    # [B, L, M] the distance the clustering objectives use
  activations: jax.Array  # [B, L, M] dense view of a: zero outside each position's top-k
  top_values: jax.Array   # [B, L, k] the k selected activations (>= 0), descending
  top_indices: jax.Array  # [B, L, k] their prototype ids
  temperature: jax.Array  # [] tau


@struct.dataclass
class Controller:
  """A linear prototype controller: a' = relu((1 + g) * a + b) on each position's active
  prototypes (zero elsewhere), applied after the top-k so the contributions stay exact."""
  gain_M: jax.Array  # [M] g
  bias_M: jax.Array  # [M] b


def apply_controller(activations_BxLxM, top_values_BxLxk, top_indices_BxLxk,
                     controller: Controller):
  """(a' dense [B, L, M], a' at the top-k [B, L, k]); g = b = 0 returns a unchanged.

  Only active entries (a > 0) move: an inactive prototype never switches on, so the
  sparsity pattern, and hence c_j(y) = a'_j <U_j, E_y>, is that of the top-k.
  """
  gain = controller.gain_M.astype(jnp.float32)
  bias = controller.bias_M.astype(jnp.float32)
  dense = jnp.where(activations_BxLxM > 0,
                    jax.nn.relu((1.0 + gain) * activations_BxLxM + bias), 0.0)
  top = jnp.where(top_values_BxLxk > 0,
                  jax.nn.relu((1.0 + gain[top_indices_BxLxk]) * top_values_BxLxk
                              + bias[top_indices_BxLxk]), 0.0)
  return dense, top


def temperature(log_temperature: jax.Array, cfg: PrototypeConfig) -> jax.Array:
  return jnp.clip(jnp.exp(log_temperature), cfg.min_temperature, cfg.max_temperature)


def similarity_and_distance(h_BxLxD, keys_MxD, similarity: str):
  """(similarity, distance) of every hidden state to every prototype key, float32 [B, L, M]."""
  h = h_BxLxD.astype(jnp.float32)
  keys = keys_MxD.astype(jnp.float32)
  if similarity == "cosine":
    h_unit = h * jax.lax.rsqrt(jnp.sum(h * h, -1, keepdims=True) + 1e-12)
    keys_unit = keys * jax.lax.rsqrt(jnp.sum(keys * keys, -1, keepdims=True) + 1e-12)
    cos = jnp.einsum("bld,md->blm", h_unit, keys_unit)
    return cos, 1.0 - cos
  sq_dist = (jnp.sum(h * h, -1, keepdims=True) - 2.0 * jnp.einsum("bld,md->blm", h, keys)
             + jnp.sum(keys * keys, -1))
  sq_dist = jnp.maximum(sq_dist, 0.0)
  # ProtoPNet's log-similarity: positive and decreasing in distance, so relu keeps it.
  return jnp.log((sq_dist + 1.0) / (sq_dist + _NEG_SQ_EPS)), sq_dist


def _select_top_k(scores_NxM, k: int, axis_name: str | None):
  """Top-k of relu(scores) over M, where M may be this shard's slice of the bank.

  Returns the dense activations of this slice and the global (values, indices) [N, k].
  """
  m_local = scores_NxM.shape[-1]
  shard = jax.lax.axis_index(axis_name) if axis_name else 0
  candidates = jax.lax.stop_gradient(scores_NxM)
  values, indices = jax.lax.top_k(candidates, min(k, m_local))
  indices = indices + shard * m_local
  if axis_name:  # merge the k-per-shard candidates into a global top-k
    values = jax.lax.all_gather(values, axis_name, axis=-1, tiled=True)
    indices = jax.lax.all_gather(indices, axis_name, axis=-1, tiled=True)
  top_values, order = jax.lax.top_k(values, k)
  top_indices = jnp.take_along_axis(indices, order, axis=-1)
  local = top_indices - shard * m_local
  local = jnp.where((local >= 0) & (local < m_local), local, m_local)  # m_local is dropped
  selected = jax.vmap(lambda row, idx: row.at[idx].set(True, mode="drop"))(
      jnp.zeros(scores_NxM.shape, bool), local)
  # Gradients reach exactly the selected scores; everything else is a hard zero.
  activations = jnp.where(selected, jax.nn.relu(scores_NxM), 0.0)
  return activations, jax.nn.relu(top_values), top_indices


def sparse_top_k(scores_BxLxM: jax.Array, k: int):
  """(activations [B, L, M], top_values [B, L, k], top_indices [B, L, k]).

  With the bank sharded over a mesh axis, each shard takes its local top-k and the
  candidates are all-gathered and merged; the [B, L, M] tensor is never gathered.
  Ties: among equal scores the lower prototype id wins and comes first (jax.lax.top_k's
  order on the whole bank; shards are merged in id order, so sharding never changes it).
  """
  chex.assert_rank(scores_BxLxM, 3)  # [batch, length, prototypes]
  batch, length, m = scores_BxLxM.shape
  flat = scores_BxLxM.reshape(batch * length, m)
  spec = sharding.logical_to_spec(("batch", "length", "prototypes"))
  bank_axis = spec[2]
  if sharding.axis_size("prototypes") == 1 or bank_axis is None:
    act, top_values, top_indices = _select_top_k(flat, k, None)
  else:
    axis_name = bank_axis if isinstance(bank_axis, str) else bank_axis[0]
    row_spec = jax.sharding.PartitionSpec(None, axis_name)
    act, top_values, top_indices = jax.shard_map(
        lambda s: _select_top_k(s, k, axis_name),
        in_specs=row_spec,
        out_specs=(row_spec, jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec()),
        axis_names={axis_name},
        check_vma=False,
    )(flat)
  act, top_values, top_indices = (act.reshape(batch, length, m),
                                  top_values.reshape(batch, length, k),
                                  top_indices.reshape(batch, length, k))
  chex.assert_shape(act, (batch, length, m))                   # [B, L, M]
  chex.assert_shape([top_values, top_indices], (batch, length, k))  # [B, L, k]
  return act, top_values, top_indices


def mix_values(activations_BxLxM, values_MxD):
  """sum_j a_j U_j: the hidden state the unembedding reads, [B, L, D]."""
  return jnp.einsum("blm,md->bld", activations_BxLxM, values_MxD.astype(jnp.float32))


def logits_from_mixture(mixed_BxLxD, unembedding_VxD):
  return jnp.einsum("bld,vd->blv", mixed_BxLxD, unembedding_VxD.astype(jnp.float32))


def prototype_contributions(top_values_BxLxk, top_indices_BxLxk, values_MxD, unembedding_VxD,
                            token_ids_BxL):
  """c_j(y) = a_j <U_j, E_y> for the k active prototypes and the given tokens y, [B, L, k].

  Summed over k this equals the logit of y at each position.
  """
  u_BxLxkxD = jnp.take(values_MxD.astype(jnp.float32), top_indices_BxLxk, axis=0)
  e_BxLxD = jnp.take(unembedding_VxD.astype(jnp.float32), token_ids_BxL, axis=0)
  return top_values_BxLxk * jnp.einsum("blkd,bld->blk", u_BxLxkxD, e_BxLxD)


def contributions_all_tokens(top_values_BxLxk, top_indices_BxLxk, values_MxD, unembedding_VxD):
  """c_j(y) for every vocabulary entry y, [B, L, k, V] (for inspection; memory heavy)."""
  u_BxLxkxD = jnp.take(values_MxD.astype(jnp.float32), top_indices_BxLxk, axis=0)
  per_token = jnp.einsum("blkd,vd->blkv", u_BxLxkxD, unembedding_VxD.astype(jnp.float32))
  return top_values_BxLxk[..., None] * per_token


def prototype_logits(h_BxLxD, keys_MxD, values_MxD, log_temperature, unembedding_VxD,
                     cfg: PrototypeConfig, suppressed_M: jax.Array | None = None, *,
                     controller: Controller | None = None):
  """The whole head as one pure function: (logits [B, L, V], PrototypeOutput).

  `suppressed_M` (bool [M]) removes prototypes before the top-k; the next best fill in.
  `controller` rescales the selected activations (see `apply_controller`); activations and
  top_values then hold a', so contributions computed from them still sum to the logits.
  """
  # Shapes are pinned at trace time: h [batch, length, d], keys/values [M, d], E [vocab, d].
  chex.assert_rank(h_BxLxD, 3)
  batch, length, d = h_BxLxD.shape
  m, vocab = keys_MxD.shape[0], unembedding_VxD.shape[0]
  chex.assert_shape([keys_MxD, values_MxD], (m, d))
  chex.assert_shape(unembedding_VxD, (vocab, d))
  if suppressed_M is not None:
    chex.assert_shape(suppressed_M, (m,))
  sim, dist = similarity_and_distance(h_BxLxD, keys_MxD, cfg.similarity)
  tau = temperature(log_temperature, cfg)
  scores = sharding.constrain(sim / tau, ("batch", "length", "prototypes"))
  if suppressed_M is not None:
    scores = jnp.where(suppressed_M, -jnp.inf, scores)
  activations, top_values, top_indices = sparse_top_k(scores, cfg.top_k)
  if controller is not None:
    activations, top_values = apply_controller(activations, top_values, top_indices, controller)
  activations = sharding.constrain(activations, ("batch", "length", "prototypes"))
  logits = logits_from_mixture(mix_values(activations, values_MxD), unembedding_VxD)
  chex.assert_shape(logits, (batch, length, vocab))                     # [B, L, V]
  chex.assert_shape([scores, dist, activations], (batch, length, m))    # [B, L, M]
  chex.assert_shape([top_values, top_indices], (batch, length, cfg.top_k))  # [B, L, k]
  return logits, PrototypeOutput(scores=scores, distances=dist, activations=activations,
                                 top_values=top_values, top_indices=top_indices,
                                 temperature=tau)


class PrototypeHead(nnx.Module):
  """Parameters of the head; the maths are `prototype_logits`."""

  def __init__(self, model_cfg: ModelConfig, cfg: PrototypeConfig, rngs: nnx.Rngs):
    m, d = cfg.num_prototypes, model_cfg.d_model
    pd = jnp.dtype(model_cfg.param_dtype)
    # Keys live where RMS-normalised hidden states live (norm about sqrt(D)).
    self.keys = nnx.Param(jax.random.normal(rngs.params(), (m, d), jnp.float32).astype(pd),
                          out_sharding=("prototypes", "embed"))
    self.values = nnx.Param(
        (model_cfg.init_std * jax.random.normal(rngs.params(), (m, d), jnp.float32)).astype(pd),
        out_sharding=("prototypes", "embed"))
    self.log_temperature = nnx.Param(jnp.log(jnp.float32(cfg.init_temperature)))
    self.cfg = cfg

  def __call__(self, h_BxLxD, unembedding_VxD, suppressed_M=None, *, controller=None):
    return prototype_logits(h_BxLxD, self.keys[...], self.values[...],
                            self.log_temperature[...], unembedding_VxD, self.cfg, suppressed_M,
                            controller=controller)
