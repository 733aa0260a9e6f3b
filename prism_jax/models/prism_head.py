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
_FORCE = 1e9  # a selection bias no score reaches


@struct.dataclass
class PrototypeOutput:
  """Everything the head computed for a batch; shapes [B, L, ...]."""
  scores: jax.Array       # [B, L, M] similarity / tau, before relu and top-k
  distances: jax.Array    # [B, L, M] the distance the clustering objectives use
  activations: jax.Array  # [B, L, M] dense view of a: zero outside each position's top-k
  top_values: jax.Array   # [B, L, k] the k selected activations (>= 0), descending
  top_indices: jax.Array  # [B, L, k] their prototype ids
  temperature: jax.Array  # [] tau
  scored_hidden: jax.Array | None = None  # [B, L, D] h as the keys saw it (whitened), or None


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


def unit_rows(x_MxD):
  x = x_MxD.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-12)


def _similarity(h, keys, similarity: str, product, keys_are_unit: bool = False):
  """(similarity, distance) with `product(h, keys)` contracting D: the one set of formulas
  for the dense bank and for gathered rows. Cosine normalises the keys before the product,
  so the product reads the unit keys (EK-FAC's key site, prism_jax/attribution/capture.py)."""
  h = h.astype(jnp.float32)
  keys = keys.astype(jnp.float32)
  inv_h = jax.lax.rsqrt(jnp.sum(h * h, -1, keepdims=True) + 1e-12)
  if similarity == "cosine":
    cos = product(h * inv_h, keys if keys_are_unit else unit_rows(keys))
    return cos, 1.0 - cos
  dot = product(h, keys)
  key_sq = jnp.sum(keys * keys, -1)
  if similarity == "dot":  # one product; the cosine for the distance is a rescaling of it
    return dot, 1.0 - dot * inv_h * jax.lax.rsqrt(key_sq + 1e-12)
  sq_dist = jnp.maximum(jnp.sum(h * h, -1, keepdims=True) - 2.0 * dot + key_sq, 0.0)
  # ProtoPNet's log-similarity: positive and decreasing in distance, so relu keeps it.
  return jnp.log((sq_dist + 1.0) / (sq_dist + _NEG_SQ_EPS)), sq_dist


def similarity_and_distance(h_BxLxD, keys_MxD, similarity: str):
  """(similarity, distance) of every hidden state to every prototype key, float32 [B, L, M]."""
  return _similarity(h_BxLxD, keys_MxD, similarity,
                     lambda h, keys: jnp.einsum("bld,md->blm", h, keys))


def selected_similarity_and_distance(h_BxLxD, keys_BxLxkxD, similarity: str,
                                     keys_are_unit: bool = False):
  """`similarity_and_distance` for k keys per position (gathered rows), [B, L, k].

  The gradient of a selected score costs k*D per position instead of the M*D of the dense
  product's backward pass. `keys_are_unit` (cosine): the rows were gathered from
  `unit_rows(keys)`, as the dense path normalises.
  """
  return _similarity(h_BxLxD, keys_BxLxkxD, similarity,
                     lambda h, keys: jnp.einsum("bld,blkd->blk", h, keys), keys_are_unit)


def _select_top_k(scores_NxM, k: int, axis_name: str | None, bias_M=None):
  """Top-k of relu(scores) over M, where M may be this shard's slice of the bank.

  `bias_M` (this slice's) shifts the choice only: the returned values are the unbiased
  relu(scores) of the chosen prototypes, re-sorted descending.
  Returns the dense activations of this slice and the global (values, indices) [N, k].
  """
  m_local = scores_NxM.shape[-1]
  shard = jax.lax.axis_index(axis_name) if axis_name else 0
  candidates = jax.lax.stop_gradient(scores_NxM)
  if bias_M is not None:
    candidates = candidates + jax.lax.stop_gradient(bias_M)
  values, indices = jax.lax.top_k(candidates, min(k, m_local))
  if bias_M is not None:  # carry the unbiased score of each candidate along
    unbiased = jnp.take_along_axis(jax.lax.stop_gradient(scores_NxM), indices, axis=-1)
  indices = indices + shard * m_local
  if axis_name:  # merge the k-per-shard candidates into a global top-k
    values = jax.lax.all_gather(values, axis_name, axis=-1, tiled=True)
    indices = jax.lax.all_gather(indices, axis_name, axis=-1, tiled=True)
    if bias_M is not None:
      unbiased = jax.lax.all_gather(unbiased, axis_name, axis=-1, tiled=True)
  if axis_name:  # (unsharded, the candidates are the top-k already, in order)
    values, order = jax.lax.top_k(values, k)
    indices = jnp.take_along_axis(indices, order, axis=-1)
    if bias_M is not None:
      unbiased = jnp.take_along_axis(unbiased, order, axis=-1)
  top_values, top_indices = values, indices
  if bias_M is not None:
    top_values, resort = jax.lax.top_k(unbiased, k)
    top_indices = jnp.take_along_axis(top_indices, resort, axis=-1)
  local = top_indices - shard * m_local
  local = jnp.where((local >= 0) & (local < m_local), local, m_local)  # m_local is dropped
  selected = jax.vmap(lambda row, idx: row.at[idx].set(True, mode="drop"))(
      jnp.zeros(scores_NxM.shape, bool), local)
  # Gradients reach exactly the selected scores; everything else is a hard zero.
  activations = jnp.where(selected, jax.nn.relu(scores_NxM), 0.0)
  return activations, jax.nn.relu(top_values), top_indices


def sparse_top_k(scores_BxLxM: jax.Array, k: int, selection_bias_M: jax.Array | None = None):
  """(activations [B, L, M], top_values [B, L, k], top_indices [B, L, k]).

  `selection_bias_M` is added to the scores for choosing the top-k only (loss-free
  balancing); activations and top_values are relu of the unbiased scores.

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
    act, top_values, top_indices = _select_top_k(flat, k, None, selection_bias_M)
  else:
    axis_name = bank_axis if isinstance(bank_axis, str) else bank_axis[0]
    row_spec = jax.sharding.PartitionSpec(None, axis_name)
    bias_spec = jax.sharding.PartitionSpec(axis_name)
    bias = (jnp.zeros((m,), jnp.float32) if selection_bias_M is None
            else selection_bias_M.astype(jnp.float32))
    act, top_values, top_indices = jax.shard_map(
        lambda s, b: _select_top_k(s, k, axis_name, None if selection_bias_M is None else b),
        in_specs=(row_spec, bias_spec),
        out_specs=(row_spec, jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec()),
        axis_names={axis_name},
        check_vma=False,
    )(flat, bias)
  act, top_values, top_indices = (act.reshape(batch, length, m),
                                  top_values.reshape(batch, length, k),
                                  top_indices.reshape(batch, length, k))
  chex.assert_shape(act, (batch, length, m))                   # [B, L, M]
  chex.assert_shape([top_values, top_indices], (batch, length, k))  # [B, L, k]
  return act, top_values, top_indices


def mix_values(activations_BxLxM, values_MxD):
  """sum_j a_j U_j: the hidden state the unembedding reads, [B, L, D]."""
  return jnp.einsum("blm,md->bld", activations_BxLxM, values_MxD.astype(jnp.float32))


def mix_selected_values(top_values_BxLxk, top_indices_BxLxk, values_MxD):
  """sum_j a_j U_j over the k selected rows only: k*D instead of M*D per position."""
  u_BxLxkxD = jnp.take(values_MxD.astype(jnp.float32), top_indices_BxLxk, axis=0)
  return jnp.einsum("blk,blkd->bld", top_values_BxLxk, u_BxLxkxD)


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


def gathers_rows(cfg: PrototypeConfig, d: int) -> bool:
  """Whether the head mixes its k selected rows by a gather (see `PrototypeConfig.mix`).

  A gather reads k*D floats per position and its backward writes as many for the values and
  again for the keys; the dense route's [N, M] activations and their gradient hold M. At
  prism_1b (k*D = 51,200, M = 16,384) the gathered rows were 3.25 GiB per chip each.
  """
  if sharding.axis_size("prototypes") != 1:  # rows live on other devices
    return False
  if cfg.mix == "auto":
    return cfg.top_k * d < cfg.num_prototypes
  return cfg.mix == "gather"


def prototype_logits(h_BxLxD, keys_MxD, values_MxD, log_temperature, unembedding_VxD,
                     cfg: PrototypeConfig, suppressed_M: jax.Array | None = None, *,
                     controller: Controller | None = None,
                     selection_bias_M: jax.Array | None = None,
                     thresholds_M: jax.Array | None = None,
                     whitening: tuple[jax.Array, jax.Array] | None = None):
  """The whole head as one pure function: (logits [B, L, V], PrototypeOutput).

  The logits are `prototype_mixture`'s mixed hidden state read by the unembedding.
  """
  vocab = unembedding_VxD.shape[0]
  chex.assert_shape(unembedding_VxD, (vocab, h_BxLxD.shape[-1]))
  mixed, out = prototype_mixture(h_BxLxD, keys_MxD, values_MxD, log_temperature, cfg,
                                 suppressed_M, controller=controller,
                                 selection_bias_M=selection_bias_M, thresholds_M=thresholds_M,
                                 whitening=whitening)
  logits = logits_from_mixture(mixed, unembedding_VxD)
  chex.assert_shape(logits, (*h_BxLxD.shape[:2], vocab))                # [B, L, V]
  return logits, out


def prototype_mixture(h_BxLxD, keys_MxD, values_MxD, log_temperature, cfg: PrototypeConfig,
                      suppressed_M: jax.Array | None = None, *,
                      controller: Controller | None = None,
                      selection_bias_M: jax.Array | None = None,
                      thresholds_M: jax.Array | None = None,
                      whitening: tuple[jax.Array, jax.Array] | None = None):
  """(mixed [B, L, D], PrototypeOutput): the hidden state the unembedding reads.

  `suppressed_M` (bool [M]) removes prototypes before the top-k; the next best fill in.
  `controller` rescales the selected activations (see `apply_controller`); activations and
  top_values then hold a', so contributions computed from them still sum to the logits.
  `selection_bias_M` shifts only which prototypes are chosen; `thresholds_M` (theta) is
  subtracted from the similarity inside the relu, s_j = (sim_j - theta_j) / tau. With
  `cfg.base_prototype`, prototype 0 takes one of the k slots at every position with a_0 = 1.
  `whitening` (mu [D], W [D, D]): the keys score h' = (h - mu) W instead of h, in the choice
  and in the weights (a function of h still, so the contributions stay exact).
  """
  # Shapes are pinned at trace time: h [batch, length, d], keys/values [M, d].
  chex.assert_rank(h_BxLxD, 3)
  batch, length, d = h_BxLxD.shape
  m = keys_MxD.shape[0]
  chex.assert_shape([keys_MxD, values_MxD], (m, d))
  if suppressed_M is not None:
    chex.assert_shape(suppressed_M, (m,))
  h_raw = h_BxLxD
  if whitening is not None:  # (mu [D], W [D, D]): statistics, no gradient
    mu_D, w_DxD = (jax.lax.stop_gradient(jnp.asarray(x, jnp.float32)) for x in whitening)
    h_BxLxD = (h_BxLxD.astype(jnp.float32) - mu_D) @ w_DxD
  sim, dist = similarity_and_distance(h_BxLxD, keys_MxD, cfg.similarity)
  tau = temperature(log_temperature, cfg)
  base_M = jnp.arange(m) == 0

  def finish_scores(sim_, ids):
    """sim -> scores for prototype ids `ids` (broadcast against sim_): the one recipe
    that both the dense [B, L, M] scores and the k selected ones follow."""
    if thresholds_M is not None:
      sim_ = sim_ - jnp.asarray(thresholds_M, jnp.float32)[ids]
    scores_ = sim_ / tau
    if cfg.base_prototype:  # prototype 0: a constant score 1, so a_0 = 1
      scores_ = jnp.where(ids == 0, 1.0, scores_)
    if suppressed_M is not None:
      scores_ = jnp.where(jnp.asarray(suppressed_M)[ids], -jnp.inf, scores_)
    return scores_

  scores = sharding.constrain(finish_scores(sim, jnp.arange(m)),
                              ("batch", "length", "prototypes"))
  if cfg.base_prototype:  # ... and forced into every top-k
    force_M = jnp.where(base_M, _FORCE, 0.0)
    selection_bias_M = force_M if selection_bias_M is None else selection_bias_M + force_M
  activations, top_values, top_indices = sparse_top_k(scores, cfg.top_k, selection_bias_M)
  if controller is not None:
    activations, top_values = apply_controller(activations, top_values, top_indices, controller)
  activations = sharding.constrain(activations, ("batch", "length", "prototypes"))
  if gathers_rows(cfg, d):
    # Gather the k selected value rows (a dense [B, L, M] x [M, D] mix multiplies M - k
    # zeros per position). The weights equal top_values exactly (their forward value is
    # read from the dense scores); their gradient comes from the k selected keys alone
    # (the dense product's backward pass would spend M*D per position on M - k zeros).
    if controller is not None:
      weights = top_values
    else:
      # Cosine gathers from the unit keys (an [M, D] rescaling), so that the gathered rows
      # are the same matrix the dense scores read (one EK-FAC site, prism_jax/attribution).
      cosine = cfg.similarity == "cosine"
      table = unit_rows(keys_MxD) if cosine else keys_MxD
      sel_sim, _ = selected_similarity_and_distance(
          h_BxLxD, jnp.take(table, top_indices, axis=0), cfg.similarity, keys_are_unit=cosine)
      sel_scores = finish_scores(sel_sim, top_indices)
      dense_value = jax.lax.stop_gradient(jnp.take_along_axis(scores, top_indices, axis=-1))
      # (a suppressed prototype can only be chosen when fewer than k remain: score -inf)
      delta = jnp.where(jnp.isfinite(sel_scores),
                        sel_scores - jax.lax.stop_gradient(sel_scores), 0.0)
      weights = jax.nn.relu(dense_value + delta)
    mixed = mix_selected_values(weights, top_indices, values_MxD)
  else:  # the sparse activations times the bank (a split bank: each shard its own rows)
    mixed = mix_values(activations, values_MxD)
  if cfg.straight_through:  # exactly zero forward; h also gets the dense head's gradient
    h32 = h_raw.astype(jnp.float32)
    mixed = mixed + cfg.straight_through * (h32 - jax.lax.stop_gradient(h32))
  chex.assert_shape(mixed, (batch, length, d))                         # [B, L, D]
  chex.assert_shape([scores, dist, activations], (batch, length, m))    # [B, L, M]
  chex.assert_shape([top_values, top_indices], (batch, length, cfg.top_k))  # [B, L, k]
  return mixed, PrototypeOutput(scores=scores, distances=dist, activations=activations,
                                 top_values=top_values, top_indices=top_indices,
                                 temperature=tau,
                                 scored_hidden=None if whitening is None else h_BxLxD)


class PrototypeHead(nnx.Module):
  """Parameters of the head; the maths are `prototype_logits`."""

  def __init__(self, model_cfg: ModelConfig, cfg: PrototypeConfig, rngs: nnx.Rngs):
    m, d = cfg.num_prototypes, model_cfg.d_model
    pd = jnp.dtype(model_cfg.param_dtype)
    keys = cfg.key_init_std * jax.random.normal(rngs.params(), (m, d), jnp.float32)
    values = model_cfg.init_std * jax.random.normal(rngs.params(), (m, d), jnp.float32)
    if cfg.tie_init:
      keys = values * (cfg.key_init_std / model_cfg.init_std)
    if cfg.key_renorm:
      keys = renormalise_keys(keys, cfg, d)
    self.keys = nnx.Param(keys.astype(pd), out_sharding=("prototypes", "embed"))
    self.values = nnx.Param(values.astype(pd), out_sharding=("prototypes", "embed"))
    self.log_temperature = nnx.Param(jnp.log(jnp.float32(cfg.init_temperature)))
    # Optional per-prototype state. The selection bias and the idle counter get no gradient
    # (Adam leaves a zero-gradient leaf unchanged); the train step updates them.
    if cfg.selection_bias_rate:
      self.selection_bias = nnx.Param(jnp.zeros((m,), jnp.float32), out_sharding=("prototypes",))
    if cfg.revive_after:
      self.idle_steps = nnx.Param(jnp.zeros((m,), jnp.float32), out_sharding=("prototypes",))
    if cfg.thresholds:
      self.thresholds = nnx.Param(jnp.zeros((m,), jnp.float32), out_sharding=("prototypes",))
    if cfg.whiten_rate:  # C starts as I (h is RMS-normalised), so W starts as I
      self.hidden_mean = nnx.Param(jnp.zeros((d,), jnp.float32), out_sharding=(None,))
      self.hidden_cov = nnx.Param(jnp.eye(d, dtype=jnp.float32), out_sharding=(None, None))
      self.whitening = nnx.Param(jnp.eye(d, dtype=jnp.float32), out_sharding=(None, None))
    self.cfg = cfg

  def __call__(self, h_BxLxD, unembedding_VxD, suppressed_M=None, *, controller=None):
    return prototype_logits(h_BxLxD, self.keys[...], self.values[...],
                            self.log_temperature[...], unembedding_VxD, self.cfg, suppressed_M,
                            controller=controller, **self.selection_state(),
                            whitening=((self.hidden_mean[...], self.whitening[...])
                                       if self.cfg.whiten_rate else None))

  def selection_state(self) -> dict:
    """The optional per-prototype selection bias and thresholds, as keyword arguments."""
    optional = lambda name: getattr(self, name)[...] if hasattr(self, name) else None
    return {"selection_bias_M": optional("selection_bias"),
            "thresholds_M": optional("thresholds")}


def renormalise_keys(keys_MxD, cfg: PrototypeConfig, d: int):
  """Every key rescaled to norm key_init_std * sqrt(D), the expected norm at init."""
  keys = keys_MxD.astype(jnp.float32)
  target = cfg.key_init_std * jnp.sqrt(jnp.float32(d))
  return keys * (target * jax.lax.rsqrt(jnp.sum(keys * keys, -1, keepdims=True) + 1e-12))


def whitening_matrix(cov_DxD, shrinkage: float):
  """sqrt(1 + s) (C + s m I)^-1/2 with m = mean eigenvalue of C, symmetric.

  s -> 0: full whitening, h' = (h - mu) W has unit variance in every direction (and the
  near-empty directions are blown up to unit variance too); s = 1: directions well above
  the mean variance are squeezed towards it and the rest scaled about evenly. An isotropic
  C (as at init, h being RMS-normalised) gives W = I/sqrt(m) for every s.
  """
  cov = cov_DxD.astype(jnp.float32)
  d = cov.shape[-1]
  mean_eigenvalue = jnp.trace(cov) / d
  cov = cov + (shrinkage + 1e-6) * mean_eigenvalue * jnp.eye(d, dtype=jnp.float32)
  eigvals, eigvecs = jnp.linalg.eigh(cov)
  scale = jnp.sqrt(1.0 + shrinkage) * jax.lax.rsqrt(jnp.maximum(eigvals, 1e-12))
  return (eigvecs * scale) @ eigvecs.T
