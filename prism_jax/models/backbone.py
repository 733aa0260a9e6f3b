"""Decoder backbone shared by the dense and PRISM language models.

Pre-norm blocks: RMSNorm -> causal self-attention with rotary positions -> residual,
RMSNorm -> gated (SwiGLU) MLP -> residual; a final RMSNorm gives the hidden state `h` that
either head reads. Attention never crosses a packed-document boundary (`segment_ids`).

Shapes are named in variable suffixes: B batch, L length, D d_model, H heads, K head_dim,
F mlp width, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from prism_jax.config import ModelConfig
from prism_jax.sharding import constrain

ACT = ("batch", "length", "embed")


@struct.dataclass
class LayerCache:
  """Keys and values of past tokens, [B, S, H, K] per layer (a leading [layers] axis when
  stacked for the whole decoder). A plain pytree: decode steps stay pure jitted functions."""
  k: jax.Array
  v: jax.Array


def init_cache(cfg: ModelConfig, batch: int, slots: int) -> LayerCache:
  """An empty cache for `slots` tokens, stacked over layers: [layers, B, S, H, K]."""
  shape = (cfg.num_layers, batch, slots, cfg.num_heads, cfg.d_model // cfg.num_heads)
  zeros = jnp.zeros(shape, _dtype(cfg.compute_dtype))
  return LayerCache(k=zeros, v=zeros)


def _param(rngs: nnx.Rngs, shape, axes, std: float, dtype) -> nnx.Param:
  value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
  return nnx.Param(value.astype(dtype), out_sharding=axes)


def _dtype(name: str):
  return jnp.dtype(name)


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float, param_dtype):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rotary(x_BxLxHxK: jax.Array, positions_BxL: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding (half-split form) at explicit per-token positions."""
  half = x_BxLxHxK.shape[-1] // 2
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions_BxL[..., None, None].astype(jnp.float32) * freq  # [B, L, 1, K/2]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x_BxLxHxK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxK.dtype)


def attention_mask(segment_ids_BxL: jax.Array) -> jax.Array:
  """[B, 1, L, L] causal mask restricted to the same (non-padding) packed document."""
  length = segment_ids_BxL.shape[-1]
  causal = jnp.tril(jnp.ones((length, length), bool))
  same_doc = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  return (causal[None] & same_doc)[:, None]


def cache_mask(new_tokens: int, slots: int, index) -> jax.Array:
  """[1, 1, T, S]: cache slot s is visible to new token t iff s <= index + t (empty slots,
  and the other new tokens' future, lie beyond)."""
  query_pos_T = index + jnp.arange(new_tokens)
  return (jnp.arange(slots)[None, :] <= query_pos_T[:, None])[None, None]


def dot_product_attention(q_BxTxHxK: jax.Array, k_BxSxHxK: jax.Array, v_BxSxHxK: jax.Array,
                          mask_Bx1xTxS: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(K), masked) v, [B, T, H, K], via `jax.nn.dot_product_attention`.

  One call for the full forward and the KV-cache decode, so each backend can substitute its
  fused kernel. Logits and softmax are float32 whatever the compute dtype; masked entries get
  a large finite negative, so a row with nothing visible stays finite (it carries no loss).
  """
  return jax.nn.dot_product_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask=mask_Bx1xTxS)


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, h = cfg.d_model, cfg.num_heads
    k = d // h
    pd = _dtype(cfg.param_dtype)
    self.wq = _param(rngs, (d, h, k), ("embed", "heads", "head_dim"), cfg.init_std, pd)
    self.wk = _param(rngs, (d, h, k), ("embed", "heads", "head_dim"), cfg.init_std, pd)
    self.wv = _param(rngs, (d, h, k), ("embed", "heads", "head_dim"), cfg.init_std, pd)
    # Output projections start smaller so the residual stream grows slowly with depth.
    out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
    self.wo = _param(rngs, (h, k, d), ("heads", "head_dim", "embed"), out_std, pd)
    self.rope_theta = cfg.rope_theta
    self.compute_dtype = _dtype(cfg.compute_dtype)

  def _qkv(self, x_BxTxD, positions_BxT):
    """Queries, keys and values [B, T, H, K] in the compute dtype, rotary applied."""
    cd = self.compute_dtype
    q = jnp.einsum("btd,dhk->bthk", x_BxTxD, self.wq[...].astype(cd))
    k = jnp.einsum("btd,dhk->bthk", x_BxTxD, self.wk[...].astype(cd))
    v = jnp.einsum("btd,dhk->bthk", x_BxTxD, self.wv[...].astype(cd))
    q = rotary(q, positions_BxT, self.rope_theta)
    k = rotary(k, positions_BxT, self.rope_theta)
    return q, k, v

  def _attend(self, q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask_Bx1xTxS):
    """The one attention of both paths (full forward and KV-cache decode), then W_o."""
    cd = self.compute_dtype
    out_BxTxHxK = dot_product_attention(q_BxTxHxK, k_BxSxHxK.astype(cd),
                                        v_BxSxHxK.astype(cd), mask_Bx1xTxS)
    return jnp.einsum("bthk,hkd->btd", out_BxTxHxK, self.wo[...].astype(cd))

  def __call__(self, x_BxLxD, positions_BxL, mask_Bx1xLxL):
    q, k, v = self._qkv(x_BxLxD, positions_BxL)
    q = constrain(q, ("batch", "length", "heads", "head_dim"))
    return self._attend(q, k, v, mask_Bx1xLxL)

  def decode(self, x_BxTxD, positions_BxT, cache: LayerCache, index):
    """T new tokens against a KV cache of S slots, of which the first `index` are filled.

    Writes the new keys/values at [index, index + T) and attends causally over the cache.
    Returns (output [B, T, D], updated cache).
    """
    q, k, v = self._qkv(x_BxTxD, positions_BxT)
    k_BxSxHxK = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), index, 1)
    v_BxSxHxK = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), index, 1)
    out = self._attend(q, k_BxSxHxK, v_BxSxHxK,
                       cache_mask(x_BxTxD.shape[1], k_BxSxHxK.shape[1], index))
    return out, LayerCache(k=k_BxSxHxK, v=v_BxSxHxK)


class GatedMLP(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, f = cfg.d_model, cfg.d_ff
    pd = _dtype(cfg.param_dtype)
    self.w_gate = _param(rngs, (d, f), ("embed", "mlp"), cfg.init_std, pd)
    self.w_up = _param(rngs, (d, f), ("embed", "mlp"), cfg.init_std, pd)
    self.w_down = _param(rngs, (f, d), ("mlp", "embed"),
                         cfg.init_std / (2 * cfg.num_layers) ** 0.5, pd)
    self.compute_dtype = _dtype(cfg.compute_dtype)

  def __call__(self, x_BxLxD):
    cd = self.compute_dtype
    gate = jnp.einsum("bld,df->blf", x_BxLxD, self.w_gate[...].astype(cd))
    up = jnp.einsum("bld,df->blf", x_BxLxD, self.w_up[...].astype(cd))
    hidden_BxLxF = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
    return jnp.einsum("blf,fd->bld", hidden_BxLxF, self.w_down[...].astype(cd))


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    pd = _dtype(cfg.param_dtype)
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd)
    self.mlp = GatedMLP(cfg, rngs)

  def __call__(self, x_BxLxD, positions_BxL, mask_Bx1xLxL):
    x_BxLxD = x_BxLxD + self.attn(self.attn_norm(x_BxLxD), positions_BxL, mask_Bx1xLxL)
    x_BxLxD = x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD))
    return constrain(x_BxLxD, ACT)

  def decode(self, x_BxTxD, positions_BxT, cache: LayerCache, index):
    attn_out, cache = self.attn.decode(self.attn_norm(x_BxTxD), positions_BxT, cache, index)
    x_BxTxD = x_BxTxD + attn_out
    x_BxTxD = x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD))
    return x_BxTxD, cache


_REMAT_POLICIES = {
    "full": None,  # save nothing; recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Decoder(nnx.Module):
  """Token embedding + blocks + final norm. Returns the final hidden state [B, L, D]."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = _dtype(cfg.param_dtype)
    self.embedding = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                            cfg.init_std, pd)
    if cfg.scan_layers:
      # One stacked Block whose parameters have a leading `layers` axis, applied by lax.scan.
      @nnx.split_rngs(splits=cfg.num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def stacked(rngs):
        return Block(cfg, rngs)

      self.blocks = stacked(rngs)
    else:
      self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd)

  def embed(self, tokens_BxL):
    x = jnp.take(self.embedding[...], tokens_BxL, axis=0).astype(_dtype(self.cfg.compute_dtype))
    return constrain(x, ACT)

  def __call__(self, tokens_BxL, positions_BxL, segment_ids_BxL):
    x_BxLxD = self.embed(tokens_BxL)
    mask = attention_mask(segment_ids_BxL)

    def apply_block(block_graph, block_state, x):
      return nnx.merge(block_graph, block_state)(x, positions_BxL, mask)

    if self.cfg.remat != "none":
      apply_block = jax.checkpoint(apply_block, static_argnums=(0,),
                                   policy=_REMAT_POLICIES[self.cfg.remat])

    if self.cfg.scan_layers:
      graph, stacked_state = nnx.split(self.blocks)
      x_BxLxD, _ = jax.lax.scan(lambda x, s: (apply_block(graph, s, x), None), x_BxLxD,
                                stacked_state)
    else:
      for block in self.blocks:
        graph, state = nnx.split(block)
        x_BxLxD = apply_block(graph, state, x_BxLxD)
    return self.final_norm(x_BxLxD)

  def decode(self, tokens_BxT, positions_BxT, cache: LayerCache, index):
    """Incremental forward of T new tokens (a prompt, then one at a time) with a KV cache.

    `cache` is stacked over layers ([layers, B, S, H, K]) for both layer layouts; `index` is
    the number of cache slots already filled. Returns (final hidden [B, T, D], new cache).
    Without packing, attention is plain causal over the filled slots.
    """
    x_BxTxD = self.embed(tokens_BxT)
    if self.cfg.scan_layers:
      graph, stacked_state = nnx.split(self.blocks)

      def layer(x, xs):
        state, layer_cache = xs
        x, layer_cache = nnx.merge(graph, state).decode(x, positions_BxT, layer_cache, index)
        return x, layer_cache

      x_BxTxD, cache = jax.lax.scan(layer, x_BxTxD, (stacked_state, cache))
    else:
      new_k, new_v = [], []
      for i, block in enumerate(self.blocks):
        x_BxTxD, layer_cache = block.decode(x_BxTxD, positions_BxT,
                                            LayerCache(k=cache.k[i], v=cache.v[i]), index)
        new_k.append(layer_cache.k)
        new_v.append(layer_cache.v)
      cache = LayerCache(k=jnp.stack(new_k), v=jnp.stack(new_v))
    return self.final_norm(x_BxTxD), cache
