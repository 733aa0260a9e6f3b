"""AdamW with linear warm-up, cosine decay and global-norm clipping (optax)."""

from __future__ import annotations

import jax
import optax

from prism_jax.config import OptimizerConfig


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  decay_steps = cfg.decay_steps or total_steps
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
      decay_steps=max(decay_steps, cfg.warmup_steps + 1),
      end_value=cfg.learning_rate * cfg.min_lr_ratio)


def _decay_mask(params):
  """Weight decay on matrices only; not on norms, temperature or prototype keys.

  Keys are excluded because decay would pull them towards the origin, away from the
  hidden states they are meant to sit among.
  """
  def decays(path, leaf):
    return leaf.ndim >= 2 and not _is_keys(path) and not _is_statistic(path)
  return jax.tree_util.tree_map_with_path(decays, params)


def _is_statistic(path) -> bool:
  """Running statistics of h that the train step sets outside the gradient."""
  return any(getattr(p, "key", None) in ("hidden_mean", "hidden_cov", "whitening")
             for p in path)


def _is_keys(path) -> bool:
  return "keys" in [getattr(p, "key", None) for p in path]


def scale_key_updates(scale: float) -> optax.GradientTransformation:
  """Multiplies the prototype keys' updates by `scale`: their own learning rate (keys get
  no weight decay, so scaling the update is scaling their learning rate)."""
  def update_fn(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(
        lambda path, u: u * scale if _is_keys(path) else u, updates), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
  parts = [
      optax.clip_by_global_norm(cfg.grad_clip_norm),
      optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                  weight_decay=cfg.weight_decay, mask=_decay_mask),
  ]
  if cfg.key_lr_scale != 1.0:  # only then: the default optimizer state keeps its structure
    parts.append(scale_key_updates(cfg.key_lr_scale))
  return optax.chain(*parts)
