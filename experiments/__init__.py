"""Named experiments: `get("prism_tiny")` returns a typed `ExperimentConfig`.

One file per family registers its configs with `@register`; a dense twin shares its PRISM
sibling's backbone, data, optimizer and schedule and swaps only the head.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Callable

from prism_jax.config import ConfigError, ExperimentConfig

_REGISTRY: dict[str, Callable[[], ExperimentConfig]] = {}


def register(fn: Callable[[], ExperimentConfig]) -> Callable[[], ExperimentConfig]:
  _REGISTRY[fn.__name__] = fn
  return fn


def dense_twin(cfg: ExperimentConfig, name: str) -> ExperimentConfig:
  """The matched dense baseline: same everything, plain unembedding head."""
  return dataclasses.replace(cfg, name=name, model=dataclasses.replace(cfg.model, head="dense"))


def names() -> list[str]:
  return sorted(_REGISTRY)


def get(name: str) -> ExperimentConfig:
  if name not in _REGISTRY:
    hint = difflib.get_close_matches(name, _REGISTRY, n=1)
    suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
    raise ConfigError(f"unknown experiment {name!r}{suggestion}; known: {', '.join(names())}")
  return _REGISTRY[name]()


from experiments import tiny, small, gpt2_scale  # noqa: E402,F401  (registers configs)
