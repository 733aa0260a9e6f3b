"""Train a small model on a fixed set of token rows, fast: the LDS study's inner loop.

Uses the project's own compiled train step (`step.compile_steps`) on a one-device mesh,
without checkpoints or logs; one compilation serves every subset of the same batch shape.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from prism_jax import sharding
from prism_jax.attribution.common import TrainingSet
from prism_jax.step import compile_steps, to_global_batch


@functools.lru_cache(maxsize=8)
def _compiled(cfg):
  mesh = sharding.make_mesh(dataclasses.replace(cfg.mesh, data=1, fsdp=1, model=1),
                            jax.devices()[:1])
  return compile_steps(cfg, mesh)


def fit(cfg, train: TrainingSet, seed: int, steps: int | None = None):
  """Params after `steps` (default cfg.train.steps) steps on `train`, shuffled by `seed`.

  `seed` also sets the initialisation (cfg.train.seed is replaced by it).
  """
  cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))
  compiled = _compiled(cfg)
  steps = steps or cfg.train.steps
  state = compiled.init()
  rng = np.random.default_rng(seed)
  b = cfg.data.batch_size
  order = np.zeros(0, np.int64)
  for _ in range(steps):
    if len(order) < b:
      order = np.concatenate([order, rng.permutation(train.num_examples)])
    index, order = order[:b], order[b:]
    state, _ = compiled.train_step(state, to_global_batch(train.batch(index),
                                                          compiled.batch_sharding))
  return jax.device_get(state.params)
