"""Train a small model on a fixed set of token rows, fast: the LDS study's inner loop.

Uses the project's own compiled train step (`step.compile_steps`) on a one-device mesh,
without checkpoints or logs; one compilation serves every subset of the same batch shape.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from prism_jax import sharding
from prism_jax.attribution.common import TrainingSet
from prism_jax.models import lm
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


# ------------------------------------------------------------------------------------------
# Many models at once: the retrain study's engine.
#
# Tiny models leave most of a CPU idle one at a time, and Python's per-step dispatch costs
# as much as the step. So K models (one per (subset, seed)) train together: the whole run
# is one jitted function, `lax.scan` over steps inside `jax.vmap` over models, with each
# model's batches gathered on device from the shared example rows by a precomputed
# schedule. One compilation serves every group of the same K (and steps, batch, config).


def schedule(members_E: np.ndarray, steps: int, batch_size: int, seed: int,
             stream: int) -> np.ndarray:
  """[steps, batch] example indices: epochs of seeded permutations of the members.

  `seed` (the retraining seed) and `stream` (the subset) together seed the order, so two
  subsets with one seed share the initialisation but not the order of their batches.
  """
  members = np.flatnonzero(members_E)
  if len(members) == 0:
    raise ValueError("cannot train on an empty subset")
  rng = np.random.default_rng([seed, stream])
  need = steps * batch_size
  epochs = -(-need // len(members))
  order = np.concatenate([rng.permutation(members) for _ in range(epochs)])
  return order[:need].reshape(steps, batch_size)


def _device_batch(rows_ExL1, lengths_E, index_B):
  """`common.rows_to_batch` on device for rows `index_B` of the shared example table."""
  rows = rows_ExL1[index_B]
  lengths = lengths_E[index_B]
  t = jnp.arange(rows.shape[1] - 1)[None, :]
  return {"inputs": rows[:, :-1], "targets": rows[:, 1:],
          "segment_ids": (t < lengths[:, None]).astype(jnp.int32),
          "positions": jnp.broadcast_to(t, rows[:, :-1].shape).astype(jnp.int32),
          "loss_mask": (t < lengths[:, None] - 1).astype(jnp.float32)}


@functools.lru_cache(maxsize=4)
def _group_trainer(cfg):
  """jit((init params [K], rows, lengths, schedules [K, steps, B]) -> params [K])."""
  from prism_jax.optim import make_optimizer
  from prism_jax.step import TrainState, make_train_step

  graphdef, _ = lm.abstract_model(cfg)
  tx = make_optimizer(cfg.optimizer, cfg.train.steps)
  train_step = make_train_step(graphdef, cfg, tx)

  def one(params, rows, lengths, schedule_SxB):
    zero = jnp.zeros((), jnp.int32)
    state = TrainState(step=zero, params=params, opt_state=tx.init(params),
                       nonfinite_streak=zero, nonfinite_total=zero)

    def body(state, index_B):
      state, _ = train_step(state, _device_batch(rows, lengths, index_B))
      return state, None

    state, _ = jax.lax.scan(body, state, schedule_SxB)
    return state.params

  return jax.jit(jax.vmap(one, in_axes=(0, None, None, 0)))


@functools.lru_cache(maxsize=8)
def initial_params(cfg, seed: int):
  """The seed's initialisation (host arrays): shared by every subset of that seed."""
  return jax.device_get(lm.init(cfg, seed)[1])


def fit_group(cfg, train: TrainingSet, members_KxE: np.ndarray, seeds_K, streams_K):
  """Params of K models trained together, stacked on a leading [K] axis.

  Model i trains cfg.train.steps steps on the examples where members_KxE[i], from seed
  seeds_K[i]'s initialisation, in the order seeded by (seeds_K[i], streams_K[i]).
  """
  steps, batch = cfg.train.steps, cfg.data.batch_size
  schedules = np.stack([schedule(m, steps, batch, int(s), int(t))
                        for m, s, t in zip(members_KxE, seeds_K, streams_K)]).astype(np.int32)
  inits = [initial_params(cfg, int(s)) for s in seeds_K]
  stacked = jax.tree.map(lambda *x: np.stack(x), *inits)
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
    return _group_trainer(cfg)(stacked, train.rows, train.lengths, schedules)
