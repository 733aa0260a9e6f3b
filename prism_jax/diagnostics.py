"""Health of the prototype head, computed in the train step and logged with its metrics.

  prototypes/key_drift_cos     median_j cos(P_j, P_j at init): 1.0 means the keys never moved
                               (the train step: on logged steps only, NaN on the others)
  prototypes/best_match_cos    median over tokens of max_j cos(h, P_j): near 1 with keys that
                               also sit near each other means collapse onto the data
  prototypes/key_pair_cos      mean cos over pairs of (the first 256) keys: collapse indicator
  prototypes/usage_perplexity  exp(entropy) of the batch's selection counts; M if uniform
  prototypes/dead_in_batch     fraction of prototypes selected by no token of the batch
  prototypes/top1_share        mean over tokens of a_top1 / sum_j a_j: how peaked the mixture is

All are batch-level and carry no gradient. Shapes: N tokens, M prototypes, k selected.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_PAIR_SAMPLE = 256  # keys used for the pairwise cosine: O(256^2 D), whatever M is


def _unit(x):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-12)


def _masked_median(values_N, mask_N):
  return jnp.nanmedian(jnp.where(mask_N > 0, values_N, jnp.nan))


def key_drift_cos(keys_MxD, initial_keys_MxD):
  return jnp.median(jnp.sum(_unit(keys_MxD) * _unit(initial_keys_MxD), -1))


def best_match_cos(h_NxD, keys_MxD, mask_N):
  cos_NxM = _unit(h_NxD) @ _unit(keys_MxD).T
  return _masked_median(jnp.max(cos_NxM, -1), mask_N)


def key_pair_cos(keys_MxD, sample: int = _PAIR_SAMPLE):
  unit = _unit(keys_MxD[:sample])
  m = unit.shape[0]
  cos = unit @ unit.T
  return (jnp.sum(cos) - jnp.trace(cos)) / max(m * (m - 1), 1)


def usage_perplexity(usage_M):
  p = usage_M / jnp.maximum(jnp.sum(usage_M), 1)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return jnp.exp(entropy)


def top1_share(top_values_Nxk, mask_N):
  """Mean over tokens with any active mass of the largest activation's share of it."""
  mass = jnp.sum(top_values_Nxk, -1)
  share = jnp.max(top_values_Nxk, -1) / jnp.where(mass > 0, mass, 1.0)
  counted = (mask_N > 0) & (mass > 0)
  return jnp.sum(jnp.where(counted, share, 0.0)) / jnp.maximum(jnp.sum(counted), 1)


def head_diagnostics(hidden_BxLxD, top_values_BxLxk, usage_M, mask_BxL, keys_MxD,
                     initial_keys_MxD=None, best_cos_N=None) -> dict:
  """The metrics above as a dict of scalars (key drift only when the initial keys are given).

  `best_cos_N` (each token's max_j cos(h, P_j), as the head's distances already gave it)
  saves the best-match [N, M] x [M, D] product.
  """
  sg = jax.lax.stop_gradient
  d, k = hidden_BxLxD.shape[-1], top_values_BxLxk.shape[-1]
  mask_N = mask_BxL.reshape(-1)
  keys = sg(keys_MxD)
  if best_cos_N is not None:
    best = _masked_median(sg(best_cos_N).reshape(-1), mask_N)
  else:
    best = best_match_cos(sg(hidden_BxLxD).reshape(-1, d), keys, mask_N)
  out = {
      "prototypes/best_match_cos": best,
      "prototypes/key_pair_cos": key_pair_cos(keys),
      "prototypes/usage_perplexity": usage_perplexity(usage_M.astype(jnp.float32)),
      "prototypes/top1_share": top1_share(sg(top_values_BxLxk).reshape(-1, k), mask_N),
  }
  if initial_keys_MxD is not None:
    out["prototypes/key_drift_cos"] = key_drift_cos(keys, sg(initial_keys_MxD))
  return out
