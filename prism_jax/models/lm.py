"""Language models: the shared decoder backbone with a dense or a PRISM head.

The functional core used by every entry point:

  graphdef, params = init(cfg, seed)            # params: a pure dict pytree
  out = forward(graphdef, params, batch)        # LMOutput: logits, hidden, prototypes
  out, cache = decode(graphdef, params, inputs, positions, cache, index)  # KV-cached steps

`forward` returns the final hidden states and (for PRISM) the full `PrototypeOutput`, so
evaluation, attribution and control read activations and take gradients without copying
model code.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import nnx, struct

from prism_jax.config import ExperimentConfig
from prism_jax.models.backbone import Decoder, LayerCache, _param
from prism_jax.models.backbone import init_cache as _init_backbone_cache
from prism_jax.models.head_summary import HeadSummary, blocked_mixture
from prism_jax.models.prism_head import PrototypeHead, PrototypeOutput, logits_from_mixture
from prism_jax.sharding import constrain

Params = Any  # nested dict of arrays, as produced by nnx.to_pure_dict


@struct.dataclass
class LMOutput:
  logits: jax.Array                       # [B, L, V] float32
  hidden: jax.Array                       # [B, L, D] final normalised hidden state h
  prototypes: PrototypeOutput | None      # None for the dense head and the blocked head
  # the train step's head in blocks (prototypes.score_blocks > 1) returns only this
  head_summary: HeadSummary | None = None


class LanguageModel(nnx.Module):
  """Decoder backbone + head. `cfg.model.head` picks 'dense' (h E^T) or 'prism'."""

  def __init__(self, cfg: ExperimentConfig, rngs: nnx.Rngs):
    self.head_kind = cfg.model.head
    self.backbone = Decoder(cfg.model, rngs)
    if not cfg.model.tie_embeddings:
      self.unembedding = _param(rngs, (cfg.model.vocab_size, cfg.model.d_model),
                                ("vocab", "embed"), cfg.model.init_std,
                                jnp.dtype(cfg.model.param_dtype))
    if cfg.model.head == "prism":
      self.prototype_head = PrototypeHead(cfg.model, cfg.prototypes, rngs)

  def unembedding_matrix(self) -> jax.Array:
    """E [V, D]: the token embedding when tied."""
    table = self.unembedding if hasattr(self, "unembedding") else self.backbone.embedding
    return table[...]

  def __call__(self, inputs_BxL, positions_BxL=None, segment_ids_BxL=None,
               suppressed_M=None, *, controller=None, blocked_mask_BxL=None) -> LMOutput:
    """`blocked_mask_BxL` (the train step, prototypes.score_blocks > 1): the PRISM head runs
    in blocks of positions and returns the `HeadSummary` the losses read, no [B, L, M]."""
    chex.assert_rank(inputs_BxL, 2)  # [batch, length] token ids
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(inputs_BxL.shape[-1]), inputs_BxL.shape)
    if segment_ids_BxL is None:
      segment_ids_BxL = jnp.ones_like(inputs_BxL)
    chex.assert_equal_shape([inputs_BxL, positions_BxL, segment_ids_BxL])
    h_BxLxD = self.backbone(inputs_BxL, positions_BxL, segment_ids_BxL)
    if blocked_mask_BxL is not None:
      chex.assert_equal_shape([inputs_BxL, blocked_mask_BxL])
      head = self.prototype_head
      mixed, summary = blocked_mixture(h_BxLxD, blocked_mask_BxL, head.keys[...],
                                       head.values[...], head.log_temperature[...], head.cfg,
                                       head.cfg.score_blocks, **head.selection_state())
      logits = logits_from_mixture(mixed, self.unembedding_matrix())
      logits = constrain(logits, ("batch", "length", "vocab"))
      return LMOutput(logits=logits, hidden=h_BxLxD, prototypes=None, head_summary=summary)
    return self.readout(h_BxLxD, suppressed_M, controller=controller)

  def decode(self, inputs_BxT, positions_BxT, cache: LayerCache, index,
             suppressed_M=None, *, controller=None) -> tuple[LMOutput, LayerCache]:
    """Incremental forward over T new tokens with a KV cache (see `Decoder.decode`)."""
    chex.assert_rank(inputs_BxT, 2)  # [batch, new tokens]
    chex.assert_equal_shape([inputs_BxT, positions_BxT])
    h_BxTxD, cache = self.backbone.decode(inputs_BxT, positions_BxT, cache, index)
    return self.readout(h_BxTxD, suppressed_M, controller=controller), cache

  def readout(self, h_BxLxD, suppressed_M=None, *, controller=None) -> LMOutput:
    """The dense or PRISM head over final hidden states h [batch, length, d]."""
    unembedding = self.unembedding_matrix()
    chex.assert_rank(h_BxLxD, 3)
    batch, length, d = h_BxLxD.shape
    chex.assert_shape(unembedding, (None, d))  # [vocab, d]
    if self.head_kind == "dense":
      logits = jnp.einsum("bld,vd->blv", h_BxLxD.astype(jnp.float32),
                          unembedding.astype(jnp.float32))
      prototypes = None
    else:
      logits, prototypes = self.prototype_head(h_BxLxD, unembedding, suppressed_M,
                                               controller=controller)
    logits = constrain(logits, ("batch", "length", "vocab"))
    chex.assert_shape(logits, (batch, length, unembedding.shape[0]))  # [B, L, V]
    return LMOutput(logits=logits, hidden=h_BxLxD, prototypes=prototypes)


def abstract_model(cfg: ExperimentConfig):
  """(graphdef, abstract nnx.State of Params) without allocating anything.

  Shapes only: evaluated outside any active mesh (a tool runs inside its run's mesh, where
  nnx would read the parameters' logical names as mesh axes)."""
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
    model = nnx.eval_shape(lambda: LanguageModel(cfg, nnx.Rngs(0)))
  return nnx.split(model, nnx.Param)


def init(cfg: ExperimentConfig, seed: int = 0):
  """(graphdef, params) with params as a pure dict pytree of arrays."""
  graphdef, state = nnx.split(LanguageModel(cfg, nnx.Rngs(seed)), nnx.Param)
  return graphdef, nnx.to_pure_dict(state)


def forward(graphdef, params: Params, batch: dict, suppressed_M=None, *,
            controller=None, training: bool = False) -> LMOutput:
  """Pure forward pass over a batch dict (inputs, positions, segment_ids).

  `training`: the train step's forward, the only one that adds the straight-through
  gradient (`prototypes.straight_through`) and runs the head in blocks of positions
  (`prototypes.score_blocks`; `LMOutput.head_summary` then replaces `prototypes`). Every
  other caller differentiates the model as it computes its logits: attribution's
  per-example gradients must be the model's.
  """
  model = nnx.merge(graphdef, params)
  if not training:
    _without_straight_through(model)
  head = getattr(model, "prototype_head", None)
  blocked = (training and head is not None and head.cfg.score_blocks > 1
             and suppressed_M is None and controller is None)
  return model(batch["inputs"], batch.get("positions"), batch.get("segment_ids"), suppressed_M,
               controller=controller,
               blocked_mask_BxL=batch["loss_mask"] if blocked else None)


def _without_straight_through(model: LanguageModel) -> None:
  head = getattr(model, "prototype_head", None)
  if head is not None and head.cfg.straight_through:
    head.cfg = dataclasses.replace(head.cfg, straight_through=0.0)


def init_cache(cfg: ExperimentConfig, batch: int, slots: int | None = None) -> LayerCache:
  """An empty KV cache ([layers, B, S, H, K]); S defaults to model.max_seq_len."""
  return _init_backbone_cache(cfg.model, batch, slots or cfg.model.max_seq_len)


def decode(graphdef, params: Params, inputs_BxT, positions_BxT, cache: LayerCache, index,
           suppressed_M=None, *, controller=None) -> tuple[LMOutput, LayerCache]:
  """Pure incremental forward: T new tokens after `index` cached ones -> (out, new cache).

  Prefill with the whole prompt (index 0), then feed one token at a time; the logits equal
  those of `forward` over the full sequence at every position.
  """
  model = nnx.merge(graphdef, params)
  return model.decode(inputs_BxT, positions_BxT, cache, index, suppressed_M,
                      controller=controller)


def unembedding(params: Params) -> jax.Array:
  """E [V, D] from a params dict (tied or separate)."""
  return params["unembedding"] if "unembedding" in params else params["backbone"]["embedding"]


def count_params(tree) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))
