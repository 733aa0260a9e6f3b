"""Training objectives: next-token cross-entropy plus PRISM's clustering terms.

Each term is a pure function of the model output and the batch's loss mask, is weighted
from `LossConfig` and reported on its own, so a run's log shows what each one is doing.
Shapes: N tokens (flattened batch x length), M prototypes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from prism_jax.config import LossConfig
from prism_jax.models import head_summary, prism_head
from prism_jax.models.lm import LMOutput

_BIG = 1e9


def cross_entropy(logits_BxLxV, targets_BxL, mask_BxL):
  """(mean next-token cross-entropy over masked tokens, number of tokens)."""
  per_token = optax.softmax_cross_entropy_with_integer_labels(
      logits_BxLxV.astype(jnp.float32), targets_BxL)
  count = jnp.sum(mask_BxL)
  return jnp.sum(per_token * mask_BxL) / jnp.maximum(count, 1.0), count


def z_loss(logits_BxLxV, mask_BxL):
  """Mean squared log-partition; keeps logits from drifting (optional)."""
  log_z = jax.nn.logsumexp(logits_BxLxV.astype(jnp.float32), axis=-1)
  return jnp.sum(log_z**2 * mask_BxL) / jnp.maximum(jnp.sum(mask_BxL), 1.0)


def cluster_loss(distances_NxM, mask_N):
  """Mean over tokens of the distance to the nearest prototype: every h lies near one."""
  nearest = jnp.min(distances_NxM, axis=-1)
  return jnp.sum(nearest * mask_N) / jnp.maximum(jnp.sum(mask_N), 1.0)


def evidence_loss(distances_NxM, mask_N):
  """Mean over prototypes of the distance to the nearest real token in the batch."""
  masked = jnp.where(mask_N[:, None] > 0, distances_NxM, _BIG)
  return jnp.mean(jnp.min(masked, axis=0))


def _pair_distance(h_NxD, keys_NxD, similarity: str):
  """The head's distance between h_n and keys_n (row by row), [N]."""
  _, dist = prism_head.selected_similarity_and_distance(h_NxD[None], keys_NxD[None, :, None],
                                                        similarity)
  return dist[0, :, 0]


def nearest_key_loss(h_NxD, keys_MxD, distances_NxM, mask_N, similarity: str):
  """`cluster_loss` with its gradient through each token's nearest key alone.

  `distances_NxM` only chooses the nearest key (no gradient flows through it); the distance
  is recomputed for that one pair, so the backward pass costs N*D, not N*M*D. Equal to
  `cluster_loss` in value and gradient (up to ties).
  """
  nearest_N = jnp.argmin(jax.lax.stop_gradient(distances_NxM), axis=-1)
  return chosen_key_loss(h_NxD, keys_MxD, nearest_N, mask_N, similarity)


def chosen_key_loss(h_NxD, keys_MxD, nearest_N, mask_N, similarity: str):
  """Mean over scored tokens of the distance to key `nearest_N[n]`, recomputed for the pair."""
  dist_N = _pair_distance(h_NxD, jnp.take(keys_MxD, nearest_N, axis=0), similarity)
  return jnp.sum(dist_N * mask_N) / jnp.maximum(jnp.sum(mask_N), 1.0)


def nearest_token_loss(h_NxD, keys_MxD, distances_NxM, mask_N, similarity: str):
  """`evidence_loss` with its gradient through each prototype's nearest real token alone."""
  masked = jnp.where(mask_N[:, None] > 0, jax.lax.stop_gradient(distances_NxM), _BIG)
  return chosen_token_loss(h_NxD, keys_MxD, jnp.argmin(masked, axis=0), mask_N, similarity)


def chosen_token_loss(h_NxD, keys_MxD, nearest_M, mask_N, similarity: str):
  """Mean over prototypes of the distance to token `nearest_M[j]`, recomputed for the pair."""
  dist_M = _pair_distance(jnp.take(h_NxD, nearest_M, axis=0), keys_MxD, similarity)
  # no real token in the batch: the dense loss's _BIG, kept
  return jnp.mean(jnp.where(jnp.sum(mask_N) > 0, dist_M, _BIG))


def diversity_loss(keys_MxD, margin: float, reduce: str = "mean_pairs", sample: int = 0,
                   rng=None):
  """relu(cos(P_i, P_j) - margin)^2 over prototype pairs: no two collapse.

  mean_pairs: the mean over the M(M-1) pairs (each key's push shrinks as 1/M^2);
  per_prototype: each key's sum over the others, averaged over keys (M times larger).
  `sample` > 0 (with `rng`): the same over `sample` keys drawn without replacement, scaled
  so that its expectation is the all-keys value.
  """
  keys = keys_MxD.astype(jnp.float32)
  m_all = keys.shape[0]
  if sample and rng is not None and sample < m_all:
    keys = jnp.take(keys, jax.random.choice(rng, m_all, (sample,), replace=False), axis=0)
  unit = keys * jax.lax.rsqrt(jnp.sum(keys * keys, -1, keepdims=True) + 1e-12)
  cos_MxM = unit @ unit.T
  m = keys.shape[0]
  off_diagonal = 1.0 - jnp.eye(m, dtype=cos_MxM.dtype)
  excess = jax.nn.relu(cos_MxM - margin) * off_diagonal
  pairs_mean = jnp.sum(excess**2) / max(m * (m - 1), 1)
  # per_prototype = each key's sum over its M - 1 partners, averaged over keys
  return pairs_mean * (m_all - 1) if reduce == "per_prototype" else pairs_mean


def balance_loss(scores_NxM, usage_M, mask_N, top_k: int):
  """Switch-style load balance, M * sum_j f_j p_j: equals 1 when usage is uniform.

  f_j: share of the batch's top-k slots taken by prototype j (`usage_M` over the slots; not
  differentiable); p_j: mean routing probability softmax(scores)_j (carries the gradient).
  The softmax is recomputed in the backward pass rather than kept: at prism_1b it is an
  [N, M] float32 tensor of 1 GiB per chip.
  """
  return balance_from_probs(head_summary.routing_probs_sum(scores_NxM, mask_N), usage_M,
                            mask_N, top_k)


def balance_from_probs(probs_sum_M, usage_M, mask_N, top_k: int):
  """`balance_loss` from sum_n softmax(scores_n) over the scored tokens, [M]."""
  m = probs_sum_M.shape[-1]
  count = jnp.maximum(jnp.sum(mask_N), 1.0)
  share_M = jax.lax.stop_gradient(usage_M.astype(jnp.float32) / (count * top_k))
  return m * jnp.sum(share_M * probs_sum_M / count)


def keys_only_scores(scores_NxM, h_NxD, keys_MxD, temperature, similarity: str):
  """`scores_NxM`'s value, with a gradient that reaches the keys and tau only.

  The similarity is recomputed from stop_gradient(h) and enters as x - stop_gradient(x), a
  zero; thresholds and a base prototype get no gradient through it.
  """
  sim, _ = prism_head.similarity_and_distance(jax.lax.stop_gradient(h_NxD)[None], keys_MxD,
                                              similarity)
  recomputed = sim[0] / temperature
  return (jax.lax.stop_gradient(scores_NxM)
          + recomputed - jax.lax.stop_gradient(recomputed))


def usage_counts(top_values_BxLxk, top_indices_BxLxk, mask_BxL, num_prototypes: int):
  """How many scored tokens selected each prototype with a non-zero activation, [M].

  Read from the k selected entries (a scatter-add into [M]), never from a dense [B, L, M].
  """
  chosen = (top_values_BxLxk > 0) & (mask_BxL[..., None] > 0)
  return jnp.zeros((num_prototypes,), jnp.int32).at[top_indices_BxLxk.reshape(-1)].add(
      chosen.reshape(-1).astype(jnp.int32), mode="drop")


def dead_fraction(usage_M) -> jax.Array:
  """Fraction of prototypes never active over the tokens that produced `usage_M`."""
  return jnp.mean((usage_M == 0).astype(jnp.float32))


def total_loss(out: LMOutput, batch: dict, keys_MxD, cfg: LossConfig, top_k: int,
               similarity: str = "cosine", step=None, summary=None):
  """(weighted objective, metrics dict with every term reported separately).

  `summary`: the head's `HeadSummary` when the caller made it already (`summarise_output`).

  With `cfg.stop_data_gradient` the cluster and evidence pairs are recomputed from
  stop_gradient(h), so those terms move only the keys (k-means style); with
  `cfg.balance_keys_only` the balance term's gradient reaches only the keys and tau.
  """
  mask = batch["loss_mask"].astype(jnp.float32)
  ce, tokens = cross_entropy(out.logits, batch["targets"], mask)
  metrics = {"loss/cross_entropy": ce, "tokens": tokens}
  objective = ce
  if cfg.z_loss:
    metrics["loss/z"] = z_loss(out.logits, mask)
    objective += cfg.z_loss * metrics["loss/z"]
  if summary is None:
    summary = summarise_output(out, mask, keys_MxD, cfg, similarity)
  if summary is not None:
    m = keys_MxD.shape[0]
    flat_mask = mask.reshape(-1)
    # the hidden states as the keys scored them (whitened, with prototypes.whiten_rate)
    scored = out.prototypes.scored_hidden if out.prototypes is not None else None
    hidden = out.hidden if scored is None else scored
    h_NxD = hidden.reshape(-1, hidden.shape[-1])
    if cfg.stop_data_gradient:
      h_NxD = jax.lax.stop_gradient(h_NxD)
    usage = usage_counts(summary.top_values, summary.top_indices, mask, m)
    # The head's distances only chose the nearest pairs; the gradient flows through those
    # pairs alone (k-means: with stop_data_gradient, into the keys only).
    terms = {
        "cluster": lambda: chosen_key_loss(h_NxD, keys_MxD, summary.nearest_key_N, flat_mask,
                                           similarity),
        "evidence": lambda: chosen_token_loss(h_NxD, keys_MxD, summary.nearest_token_M,
                                              flat_mask, similarity),
        "diversity": lambda: diversity_loss(
            keys_MxD, cfg.diversity_margin, cfg.diversity_reduce, cfg.diversity_sample,
            None if step is None else jax.random.fold_in(jax.random.key(17), step)),
        "balance": lambda: balance_from_probs(summary.probs_sum_M, usage, flat_mask, top_k),
    }
    for name, term in terms.items():
      weight = getattr(cfg, name)
      # A term at weight 0 is reported but adds no backward pass (balance: [N, M] dense).
      value = term() if weight else jax.lax.stop_gradient(term())
      metrics[f"loss/{name}"] = value
      if weight:
        objective += weight * value
    metrics["prototypes/dead_in_batch"] = dead_fraction(usage)
    metrics["prototypes/temperature"] = summary.temperature
  metrics["loss/total"] = objective
  return objective, metrics


def summarise_output(out: LMOutput, mask_BxL, keys_MxD, cfg: LossConfig, similarity: str):
  """The head's `HeadSummary` (the blocked train step made it already), or None (dense)."""
  if out.head_summary is not None:
    return out.head_summary
  protos = out.prototypes
  if protos is None:
    return None
  m = protos.scores.shape[-1]
  scores = protos.scores.reshape(-1, m)
  if cfg.balance_keys_only:
    hidden = out.hidden if protos.scored_hidden is None else protos.scored_hidden
    scores = keys_only_scores(scores, hidden.reshape(-1, hidden.shape[-1]), keys_MxD,
                              protos.temperature, similarity)
  return head_summary.summarise(protos.top_values, protos.top_indices, protos.temperature,
                                scores, protos.distances.reshape(-1, m), mask_BxL.reshape(-1))
