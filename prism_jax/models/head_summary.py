"""What the train step reads from the PRISM head, without any [N, M] tensor; the head in blocks.

The clustering terms and the diagnostics need, of the head's [N, M] scores and distances,
only each token's nearest key, each prototype's nearest scored token and the routing
probabilities summed over tokens (the balance term). `summarise` reduces a block of
positions to those; `blocked_mixture` runs the head over blocks of positions along the
length under `jax.checkpoint`, so a block's [B, L/n, M] tensors are recomputed in the
backward pass and the whole [B, L, M] never lives at once (prism_1b: 1 GiB per chip each).
Shapes: N tokens, M prototypes, k selected, C blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from prism_jax.config import PrototypeConfig
from prism_jax.models import prism_head

_BIG = 1e9  # the distance of a prototype with no scored token in its block


@struct.dataclass
class HeadSummary:
  top_values: jax.Array          # [B, L, k] the selected activations
  top_indices: jax.Array         # [B, L, k] their prototype ids
  temperature: jax.Array         # [] tau
  nearest_key_N: jax.Array       # [N] int: each token's nearest key (the head's distance)
  nearest_distance_N: jax.Array  # [N] that distance (1 - cos for cosine and dot scores)
  nearest_token_M: jax.Array     # [M] int: each prototype's nearest scored token, into N
  token_distance_M: jax.Array    # [M] that distance; _BIG when no token is scored
  probs_sum_M: jax.Array         # [M] sum over scored tokens of softmax(scores) (the gradient)


def routing_probs_sum(scores_NxM, mask_N):
  """sum_n mask_n softmax(scores_n), [M]; the softmax is recomputed in the backward pass
  rather than kept (an [N, M] float32 tensor)."""

  @jax.checkpoint
  def probs_sum(scores):
    return jnp.sum(jax.nn.softmax(scores, axis=-1) * mask_N[:, None], axis=0)

  return probs_sum(scores_NxM)


def min_and_argmin(x, axis: int):
  """(min, jnp.argmin) along `axis`: the first index of the minimum, as two plain reductions.

  XLA:CPU runs argmin's (value, index) reduction about ten times slower than a min; on
  prism_tiny's [2048, 1024] distances the two argmins were about 6% of the train step. A row
  holding NaN gives its last index (jnp.argmin: the NaN's); such a step is skipped anyway.
  """
  low = jnp.min(x, axis=axis, keepdims=True)
  index = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis % x.ndim)
  first = jnp.min(jnp.where(x == low, index, x.shape[axis]), axis=axis)
  return jnp.squeeze(low, axis), jnp.minimum(first, x.shape[axis] - 1)


def summarise(top_values, top_indices, temperature, scores_NxM, distances_NxM, mask_N):
  """A `HeadSummary` of one block of N tokens (indices into that block)."""
  distances = jax.lax.stop_gradient(distances_NxM)
  masked = jnp.where(mask_N[:, None] > 0, distances, _BIG)
  nearest_distance_N, nearest_key_N = min_and_argmin(distances, axis=-1)
  token_distance_M, nearest_token_M = min_and_argmin(masked, axis=0)
  return HeadSummary(
      top_values=top_values, top_indices=top_indices, temperature=temperature,
      nearest_key_N=nearest_key_N, nearest_distance_N=nearest_distance_N,
      nearest_token_M=nearest_token_M, token_distance_M=token_distance_M,
      probs_sum_M=routing_probs_sum(scores_NxM, mask_N))


def blocked_mixture(h_BxLxD, mask_BxL, keys_MxD, values_MxD, log_temperature,
                    cfg: PrototypeConfig, blocks: int, *, selection_bias_M=None,
                    thresholds_M=None):
  """(mixed [B, L, D], HeadSummary) of `prism_head.prototype_mixture` run over `blocks`
  blocks of L / blocks positions, one at a time in the forward and in the backward pass.

  The mixture is the unblocked one position by position; the summary equals `summarise`
  of the whole batch (up to exact ties in a nearest-token choice).
  """
  batch, length, _ = h_BxLxD.shape
  size = length // blocks
  m = keys_MxD.shape[0]

  def block(args):
    h_b, mask_b = args  # [B, l, D], [B, l]
    mixed, out = prism_head.prototype_mixture(h_b, keys_MxD, values_MxD, log_temperature, cfg,
                                              selection_bias_M=selection_bias_M,
                                              thresholds_M=thresholds_M)
    mask_n = mask_b.reshape(-1).astype(jnp.float32)
    summary = summarise(out.top_values, out.top_indices, out.temperature,
                        out.scores.reshape(-1, m), out.distances.reshape(-1, m), mask_n)
    return mixed, summary

  by_block = lambda x: jnp.swapaxes(x.reshape(batch, blocks, size, *x.shape[2:]), 0, 1)
  mixed_C, s = jax.lax.map(jax.checkpoint(block), (by_block(h_BxLxD), by_block(mask_BxL)))
  unblock = lambda x_C: jnp.swapaxes(x_C, 0, 1).reshape(batch, length, *x_C.shape[3:])
  # a block's token index b * size + i is the batch's b * length + c * size + i
  best_block_M = jnp.argmin(s.token_distance_M, axis=0)
  in_block_M = jnp.take_along_axis(s.nearest_token_M, best_block_M[None], axis=0)[0]
  nearest_token_M = ((in_block_M // size) * length + best_block_M * size + in_block_M % size)
  by_position = lambda x_CxN: unblock(x_CxN.reshape(blocks, batch, size)).reshape(-1)
  return unblock(mixed_C), HeadSummary(
      top_values=unblock(s.top_values), top_indices=unblock(s.top_indices),
      temperature=s.temperature[0],
      nearest_key_N=by_position(s.nearest_key_N),
      nearest_distance_N=by_position(s.nearest_distance_N),
      nearest_token_M=nearest_token_M.astype(jnp.int32),
      token_distance_M=jnp.min(s.token_distance_M, axis=0),
      probs_sum_M=jnp.sum(s.probs_sum_M, axis=0))
