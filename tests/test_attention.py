"""Attention through jax.nn.dot_product_attention, against the maths written the obvious way.

The reference below is the implementation the backbone had before it called
`jax.nn.dot_product_attention` (float32 logits and softmax, -1e30 on masked entries), kept
here as the oracle for the full forward (causal, packed documents) and the KV-cache path.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prism_jax.config import ModelConfig
from prism_jax.models import backbone

B, L, H, K = 2, 12, 4, 8
# Two packed documents and trailing padding (0) in row 0; one document in row 1.
SEGMENTS = np.array([[1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 0, 0],
                     [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]], np.int32)


def reference_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask_Bx1xTxS):
  """softmax(q k^T / sqrt(K) where mask else -1e30) v, float32, as the backbone used to."""
  q, k, v = (x.astype(jnp.float32) for x in (q_BxTxHxK, k_BxSxHxK, v_BxSxHxK))
  logits_BxHxTxS = jnp.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
  logits_BxHxTxS = jnp.where(mask_Bx1xTxS, logits_BxHxTxS, -1e30)
  weights = jax.nn.softmax(logits_BxHxTxS, axis=-1)
  return jnp.einsum("bhqs,bshk->bqhk", weights, v)


def reference_mask(segment_ids_BxL):
  """Token t sees token s iff s <= t and both lie in the same document (padding is its own)."""
  b, length = segment_ids_BxL.shape
  mask = np.zeros((b, 1, length, length), bool)
  for i in range(b):
    for t in range(length):
      for s in range(t + 1):
        mask[i, 0, t, s] = segment_ids_BxL[i, t] == segment_ids_BxL[i, s]
  return mask


def _qkv(dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return [jax.random.normal(key, (B, L, H, K), jnp.float32).astype(dtype) for key in keys]


def test_mask_is_causal_and_never_crosses_a_document():
  np.testing.assert_array_equal(backbone.attention_mask(jnp.asarray(SEGMENTS)),
                                reference_mask(SEGMENTS))


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_matches_reference_with_packed_documents(dtype, tol):
  q, k, v = _qkv(dtype)
  mask = backbone.attention_mask(jnp.asarray(SEGMENTS))
  got = jax.jit(backbone.dot_product_attention)(q, k, v, mask)
  assert got.shape == (B, L, H, K) and got.dtype == dtype
  np.testing.assert_allclose(np.asarray(got, np.float32),
                             np.asarray(reference_attention(q, k, v, mask)), atol=tol, rtol=tol)


def test_no_information_crosses_a_document_boundary_or_flows_back_in_time():
  q, k, v = _qkv(jnp.float32)
  mask = backbone.attention_mask(jnp.asarray(SEGMENTS))
  base = backbone.dot_product_attention(q, k, v, mask)
  # Change document 1 of row 0 (positions 0-4) entirely: document 2 (5-9) must not move.
  k2, v2 = k.at[0, :5].add(3.0), v.at[0, :5].add(3.0)
  moved = backbone.dot_product_attention(q, k2, v2, mask)
  np.testing.assert_array_equal(moved[0, 5:10], base[0, 5:10])
  assert not np.allclose(moved[0, :5], base[0, :5])
  # Change the future of row 1 (positions 6+): positions 0-5 must not move.
  moved = backbone.dot_product_attention(q, k.at[1, 6:].add(3.0), v.at[1, 6:].add(3.0), mask)
  np.testing.assert_array_equal(moved[1, :6], base[1, :6])
  np.testing.assert_array_equal(moved[0], base[0])


def _attention_module(dtype="float32"):
  cfg = ModelConfig(vocab_size=32, d_model=H * K, num_layers=2, num_heads=H, d_ff=64,
                    max_seq_len=L, compute_dtype=dtype, param_dtype="float32")
  return cfg, backbone.Attention(cfg, nnx.Rngs(0))


def reference_module(attn, x_BxLxD, positions_BxL, mask):
  """The old Attention.__call__: projections, rotary, reference attention, output projection."""
  w = lambda p: p[...].astype(jnp.float32)
  x = x_BxLxD.astype(jnp.float32)
  q = backbone.rotary(jnp.einsum("bld,dhk->blhk", x, w(attn.wq)), positions_BxL, attn.rope_theta)
  k = backbone.rotary(jnp.einsum("bld,dhk->blhk", x, w(attn.wk)), positions_BxL, attn.rope_theta)
  v = jnp.einsum("bld,dhk->blhk", x, w(attn.wv))
  return jnp.einsum("blhk,hkd->bld", reference_attention(q, k, v, mask), w(attn.wo))


def test_full_forward_module_matches_reference():
  _, attn = _attention_module()
  x = jax.random.normal(jax.random.key(1), (B, L, H * K))
  positions = jnp.asarray(np.where(SEGMENTS[:1] == 2, np.arange(L) - 5, np.arange(L)))
  positions = jnp.concatenate([positions, jnp.arange(L)[None]], axis=0)
  mask = backbone.attention_mask(jnp.asarray(SEGMENTS))
  np.testing.assert_allclose(attn(x, positions, mask), reference_module(attn, x, positions, mask),
                             atol=1e-5, rtol=1e-5)


def test_cache_path_matches_full_forward_and_reference():
  """Prefill 5 tokens, then decode one at a time into a 16-slot cache: every output equals
  the full causal forward's at that position (and the reference's)."""
  cfg, attn = _attention_module()
  slots, prompt = 16, 5
  x = jax.random.normal(jax.random.key(2), (B, L, H * K))
  positions = jnp.broadcast_to(jnp.arange(L), (B, L))
  full_mask = backbone.attention_mask(jnp.ones((B, L), jnp.int32))
  full = attn(x, positions, full_mask)
  np.testing.assert_allclose(full, reference_module(attn, x, positions, full_mask),
                             atol=1e-5, rtol=1e-5)

  zeros = jnp.zeros((B, slots, H, K), jnp.float32)
  cache = backbone.LayerCache(k=zeros, v=zeros)
  decode = jax.jit(attn.decode)
  out, cache = decode(x[:, :prompt], positions[:, :prompt], cache, 0)
  outs = [out]
  for t in range(prompt, L):
    out, cache = decode(x[:, t:t + 1], positions[:, t:t + 1], cache, t)
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5, rtol=1e-5)
  # The cache holds exactly the L keys written, rotary applied; the rest are still empty.
  np.testing.assert_array_equal(cache.k[:, L:], 0)
  k_ref = backbone.rotary(jnp.einsum("bld,dhk->blhk", x, attn.wk[...]), positions,
                          attn.rope_theta)
  np.testing.assert_allclose(cache.k[:, :L], k_ref, atol=1e-5, rtol=1e-5)


def test_cache_mask_hides_empty_slots_and_the_future():
  mask = np.asarray(backbone.cache_mask(3, 8, 2))[0, 0]
  expected = np.zeros((3, 8), bool)
  for t in range(3):
    expected[t, :2 + t + 1] = True
  np.testing.assert_array_equal(mask, expected)


def test_bfloat16_attention_matches_float32_reference_closely():
  """Attention in bfloat16 compute stays near the float32 reference maths."""
  cfg, attn = _attention_module("bfloat16")
  x = jax.random.normal(jax.random.key(3), (B, L, H * K)).astype(jnp.bfloat16)
  positions = jnp.broadcast_to(jnp.arange(L), (B, L))
  mask = backbone.attention_mask(jnp.asarray(SEGMENTS))
  got = attn(x, positions, mask)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32),
                             reference_module(attn, x, positions, mask), atol=3e-2, rtol=3e-2)
