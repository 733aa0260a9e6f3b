"""The train step's head in blocks of positions (prism_jax/models/head_summary.py) equals the
whole head: the mixture, the summary the losses read, and every gradient."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prism_jax.config import PrototypeConfig
from prism_jax.models import head_summary, prism_head

B, L, D, M, K = 2, 12, 8, 16, 3


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(B, L, D)).astype(np.float32)
  keys = rng.normal(scale=0.5, size=(M, D)).astype(np.float32)
  values = rng.normal(size=(M, D)).astype(np.float32)
  mask = np.ones((B, L), np.float32)
  mask[0, :4] = 0.0   # the first block of row 0 scores nothing ...
  mask[1, :4] = 0.0   # ... nor of row 1: block 0 has no scored token at all
  mask[1, 9] = 0.0
  return h, keys, values, mask


def _whole(h, keys, values, log_tau, mask, cfg):
  mixed, out = prism_head.prototype_mixture(h, keys, values, log_tau, cfg)
  summary = head_summary.summarise(out.top_values, out.top_indices, out.temperature,
                                   out.scores.reshape(-1, M), out.distances.reshape(-1, M),
                                   mask.reshape(-1))
  return mixed, summary


def _blocked(blocks):
  return lambda h, keys, values, log_tau, mask, cfg: head_summary.blocked_mixture(
      h, mask, keys, values, log_tau, cfg, blocks)


@pytest.mark.parametrize("similarity, straight_through", [("dot", 1.0), ("cosine", 0.0)])
@pytest.mark.parametrize("blocks", [2, 4])
def test_blocks_equal_the_whole_head_in_value_and_gradient(blocks, similarity,
                                                           straight_through):
  cfg = PrototypeConfig(num_prototypes=M, top_k=K, similarity=similarity,
                        straight_through=straight_through, key_init_std=0.02)
  h, keys, values, mask = _inputs()
  log_tau = jnp.log(jnp.float32(0.3))
  ref_mixed, ref = _whole(h, keys, values, log_tau, mask, cfg)
  mixed, got = _blocked(blocks)(h, keys, values, log_tau, mask, cfg)
  chex.assert_shape(mixed, (B, L, D))
  chex.assert_shape([got.nearest_key_N, got.nearest_distance_N], (B * L,))
  chex.assert_shape([got.nearest_token_M, got.token_distance_M, got.probs_sum_M], (M,))
  np.testing.assert_allclose(mixed, ref_mixed, rtol=1e-5, atol=1e-6)
  for field in ("top_values", "nearest_distance_N", "token_distance_M", "probs_sum_M"):
    np.testing.assert_allclose(getattr(got, field), getattr(ref, field), rtol=1e-5,
                               atol=1e-6, err_msg=field)
  for field in ("top_indices", "nearest_key_N", "nearest_token_M"):
    np.testing.assert_array_equal(getattr(got, field), getattr(ref, field), err_msg=field)
  assert mask.reshape(-1)[np.asarray(got.nearest_token_M)].all()  # only scored tokens

  # A loss that reads both differentiable outputs, as the train step does (CE through the
  # mixture, balance through the routing probabilities).
  probe = np.random.default_rng(1).normal(size=(B, L, D)).astype(np.float32)

  def loss(fn):
    def f(h, keys, values, log_tau):
      mixed, s = fn(h, keys, values, log_tau, mask, cfg)
      return jnp.sum(jnp.tanh(mixed) * probe) + jnp.sum(s.probs_sum_M ** 2)
    return jax.grad(f, argnums=(0, 1, 2, 3))

  ref_grads = loss(_whole)(h, keys, values, log_tau)
  got_grads = jax.jit(loss(_blocked(blocks)))(h, keys, values, log_tau)
  for name, g, r in zip(("h", "keys", "values", "log_tau"), got_grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5, err_msg=name)
    assert np.abs(np.asarray(r)).max() > 0, f"{name}: the reference gradient is zero"


def test_score_blocks_must_divide_the_length_and_exclude_whitening():
  from prism_jax.config import ConfigError
  from tests.synthetic import tiny_config
  with pytest.raises(ConfigError, match="score_blocks=3 does not divide data.seq_len=16"):
    tiny_config("prototypes.score_blocks=3")
  with pytest.raises(ConfigError, match="does not support prototypes.whiten_rate"):
    tiny_config("prototypes.score_blocks=2", "prototypes.whiten_rate=0.1")
  with pytest.raises(ConfigError, match="prototypes.score_blocks"):
    tiny_config("prototypes.score_blocks=0")


@pytest.mark.parametrize("axis", [0, -1])
def test_min_and_argmin_is_jnp_argmin_ties_included(axis):
  rng = np.random.default_rng(3)
  x = rng.integers(0, 4, size=(37, 29)).astype(np.float32)  # many ties in every row/column
  x[5] = 7.0                                                  # a row all one value
  low, first = head_summary.min_and_argmin(jnp.asarray(x), axis)
  np.testing.assert_array_equal(np.asarray(first), np.argmin(x, axis=axis))
  np.testing.assert_array_equal(np.asarray(low), np.min(x, axis=axis))
  chex.assert_type(first, jnp.int32)
