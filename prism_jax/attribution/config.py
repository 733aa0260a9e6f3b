"""`AttributionConfig`: every knob of the attribution methods, set as `attr.key=value`.

Kept apart from `ExperimentConfig` (attribution reads a trained run; it never changes how
the run was trained). Overrides reuse the experiment config's key/value parsing.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from prism_jax.config import check_ranges, flat_keys, parse_override

PREFIX = "attr."


@dataclasses.dataclass(frozen=True)
class AttributionConfig:
  # What is scored and shown.
  top_examples: int = 10          # examples returned per query
  span_tokens: int = 12           # context tokens shown before the highlighted token
  batch_size: int = 16            # examples per forward/backward chunk (per device: index)
  # Index (one pass over the training split, or a sample of it).
  index_examples: int = 0         # 0: every training example; else a seeded sample of N
  index_seed: int = 0
  neighbourhood_size: int = 64    # top activating training positions kept per prototype
  shard_prototypes: int = 256     # prototypes per index shard
  index_influence: bool = False   # also store g_t [N, D] + every posting (influence; small N)
  # Keep each position's prototypes, top-r softmax and p_t[y_t] in the parts once the index
  # is finished (no query reads them there: the postings carry copies; ~60 bytes per token).
  index_keep_build_fields: bool = False
  postings: int = 4096            # single_pass: postings kept per prototype, by bound (0: all)
  target_postings: int = 256      # single_pass: positions kept per target token, by bound
  softmax_top: int = 8            # single_pass: softmax entries stored per position (r)
  index_dtype: Literal["float16", "float32"] = "float16"  # stored activations/probabilities
  index_part_batches: int = 16    # batches per part file (and per resumable commit)
  # Per-prototype G_j and average softmax, read only by the values term (and `influence`):
  # "none" (the default method, the unembedding term, needs neither; the index pass is then
  # about one forward pass per batch instead of ~25x one at prism_1b), exact "blocks", or a
  # "shared" basis (scale). `attribute` builds with blocks when its method needs them, and
  # index_influence implies blocks.
  curvature: Literal["none", "blocks", "shared"] = "none"
  # single_pass: which head gradient it scores. "unembedding" (the default: the highest LDS
  # on real text, docs/attribution.md), "values" (= `influence`), or their sum "both".
  single_pass_terms: Literal["unembedding", "values", "both"] = "unembedding"
  unembedding_damping: float = 1e-3  # lambda of the vocabulary curvature 1 / (f_v + lambda)
  # single_pass: beta, how sharply a position's score falls as its prediction (top-r softmax)
  # departs from the query's (kappa^beta; 0: off). 1: the LDS study's choice on validation and
  # copied tuning queries together (docs/attribution.md).
  context_sharpness: float = 1.0
  # single_pass: a position whose last 16 input tokens equal the query's (the text it was
  # copied from) scores 1 + gamma times as much (0: off). Validation text rarely repeats 16
  # tokens of training text, so this changes little there (docs/attribution.md).
  context_match: float = 100.0
  # Prototype influence: damped Gauss-Newton, block-diagonal by prototype.
  damping: float = 1e-3           # added to every per-prototype GN block (mean over tokens)
  # TRAK: Gaussian projection of per-example gradients, Gauss-Newton inverse in that space.
  trak_projection_dim: int = 256
  trak_damping: float = 1e-3      # times the mean diagonal of Phi^T Phi / n
  trak_seed: int = 0
  trak_ensemble: int = 1          # independent projections (seeds trak_seed + i), scores averaged
  # EK-FAC over the attention and MLP projections (kronfluence recipe).
  ekfac_damping: float = 0.1      # times the mean corrected eigenvalue, per layer
  ekfac_sampled_labels: bool = True  # true Fisher (labels ~ model) rather than empirical
  ekfac_label_seed: int = 0
  ekfac_fit_examples: int = 0     # fit the factors on the first N examples (0: all of them)
  # LDS retrain study (prism_jax/attribution/study.py).
  lds_examples: int = 256         # training passages (examples) of the study
  lds_subsets: int = 64
  lds_seeds: int = 3
  lds_fraction: float = 0.5
  lds_queries: int = 100          # reported query tokens (validation text)
  lds_tuning_queries: int = 40    # other validation tokens, for choosing each damping
  lds_copied_queries: int = 40    # queries cut from training passages: is their passage first?
  lds_copied_tuning: int = 20     # other such queries, which join the tuning queries
  lds_group: int = 8              # models retrained at once (jax.vmap)
  lds_dense: bool = True          # also retrain the dense twin and score the baselines on it
  lds_bootstrap: int = 1000

  def __post_init__(self):
    check_ranges(self, prefix=PREFIX)  # every number against prism_jax/limits.py


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
  """(experiment overrides, attr.* overrides)."""
  mine = [o for o in overrides if o.strip().startswith(PREFIX)]
  return [o for o in overrides if not o.strip().startswith(PREFIX)], mine


def apply_overrides(cfg: AttributionConfig, overrides: list[str]) -> AttributionConfig:
  """Applies `attr.key=value` strings in order."""
  keys = flat_keys(cfg)
  for item in overrides:
    name, value = parse_override(item, keys, prefix=PREFIX, kind="attribution",
                                 form="attr.key=value")
    cfg = dataclasses.replace(cfg, **{name: value})
  return cfg
