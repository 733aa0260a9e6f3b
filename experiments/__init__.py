"""Named experiments: `get("prism_tiny")` returns a typed `ExperimentConfig`.

One file per family registers its configs with `@register`; a dense twin shares its PRISM
sibling's backbone, data, optimizer and schedule and swaps only the head.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Callable

from prism_jax.config import ConfigError, ExperimentConfig, LossConfig, PrototypeConfig

_REGISTRY: dict[str, Callable[[], ExperimentConfig]] = {}


def register(fn: Callable[[], ExperimentConfig]) -> Callable[[], ExperimentConfig]:
  _REGISTRY[fn.__name__] = fn
  return fn


def dense_twin(cfg: ExperimentConfig, name: str) -> ExperimentConfig:
  """The matched dense baseline: same everything, plain unembedding head."""
  return dataclasses.replace(cfg, name=name, model=dataclasses.replace(cfg.model, head="dense"))


def prototype_head(num_prototypes: int, top_k: int = 32, score_blocks: int = 1) -> PrototypeConfig:
  """The head every PRISM experiment uses: the best of the ablation rounds (docs/evaluate.md).

  Dot-product scores with keys started at the scale of every other matrix (std 0.02), so
  Adam turns them as fast as the rest; a wide bank (M >= 8 D) with k = 32 active. No
  selection bias: it moved the choice away from the best-scoring prototypes and cost
  cross-entropy, and PROTOTYPE_LOSSES keeps the bank in use without it. The straight-through
  gradient (seventh round): through the top-k alone the backbone learns only along the k
  selected keys, and at prism_small's width that left it 0.5 nats behind dense by step 100;
  with the dense head's gradient added (beta = 1; the logits are unchanged) it halved the gap.
  `score_blocks`: the train step computes the head over that many blocks of positions (the
  accelerator-scale configs, for memory; a block's forward is recomputed in the backward).
  """
  return PrototypeConfig(num_prototypes=num_prototypes, top_k=top_k, similarity="dot",
                         key_init_std=0.02, straight_through=1.0, score_blocks=score_blocks)


# The clustering terms of the same round: the pull is k-means style (keys move towards the
# hidden states, never the reverse, or both collapse together); the balance term at 0.05
# (its pull on h spreads the routing; at 0.01 a tenth of the bank went unused); the
# diversity term on 256 keys drawn each step (the all-pairs [M, M] matrices are 1 GiB each
# at M = 16,384; sampling cost nothing at prism_tiny).
PROTOTYPE_LOSSES = LossConfig(stop_data_gradient=True, balance=0.05, diversity_sample=256)


# The head every PRISM experiment had before the fifth round's winner (cosine scores,
# N(0, 1) keys, both sides of the clustering pull free, balance 0.01, the all-pairs
# diversity term), as overrides: the ablation variants change it, and the LDS study and the
# tests' memorising toy models, sized on it, pin it.
ROUND_ONE_HEAD = ("prototypes.similarity=cosine", "prototypes.key_init_std=1.0",
                  "prototypes.straight_through=0", "losses.stop_data_gradient=false",
                  "losses.balance=0.01", "losses.diversity_sample=0")


def names() -> list[str]:
  return sorted(_REGISTRY)


def get(name: str) -> ExperimentConfig:
  if name not in _REGISTRY:
    hint = difflib.get_close_matches(name, _REGISTRY, n=1)
    suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
    raise ConfigError(f"unknown experiment {name!r}{suggestion}; known: {', '.join(names())}")
  return _REGISTRY[name]()


from experiments import tiny, small, gpt2_scale  # noqa: E402,F401  (registers configs)
