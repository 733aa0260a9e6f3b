"""The train and evaluation steps: plain functions over pytrees, compiled with shardings.

  state, metrics = train_step(state, batch)
  sums = eval_step(params, batch)

`compile_steps` places the state on the mesh (sharded init via eval_shape ->
shardings -> jit(init, out_shardings=...)) and wraps both steps in `jax.jit` with
in/out shardings; nothing else in the project writes a PartitionSpec by hand.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec as P

from prism_jax import losses, sharding
from prism_jax.config import ExperimentConfig
from prism_jax.models import lm
from prism_jax.optim import learning_rate_schedule, make_optimizer

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


@struct.dataclass
class TrainState:
  step: jax.Array             # batches consumed (skipped ones included)
  params: Any
  opt_state: Any
  nonfinite_streak: jax.Array  # consecutive skipped steps
  nonfinite_total: jax.Array   # all skipped steps of the run


def prototype_keys(params):
  head = params.get("prototype_head")
  return None if head is None else head["keys"]


def all_finite(tree) -> jax.Array:
  """True when every float in `tree` is finite (one fused reduction per leaf)."""
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(graphdef, cfg: ExperimentConfig, tx: optax.GradientTransformation):
  schedule = learning_rate_schedule(cfg.optimizer, cfg.train.steps)

  def train_step(state: TrainState, batch: dict):
    def objective(params):
      out = lm.forward(graphdef, params, batch)
      return losses.total_loss(out, batch, prototype_keys(params), cfg.losses,
                               cfg.prototypes.top_k)

    (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    # A non-finite loss, gradient or update (a bad learning rate, an overflowing moment)
    # leaves parameters and optimizer state untouched, so no checkpoint is ever poisoned.
    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(params)
              & all_finite(opt_state))
    keep_if_finite = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
    new_state = TrainState(step=state.step + 1,
                           params=keep_if_finite(params, state.params),
                           opt_state=keep_if_finite(opt_state, state.opt_state),
                           nonfinite_streak=streak,
                           nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32))
    metrics["grad_norm"] = grad_norm
    metrics["learning_rate"] = schedule(state.step)
    metrics["nonfinite/streak"] = new_state.nonfinite_streak
    metrics["nonfinite/total"] = new_state.nonfinite_total
    return new_state, metrics

  return train_step


def make_eval_step(graphdef, cfg: ExperimentConfig, *, suppressed_M=None, controller=None):
  """Sums (not means) so that batches of different token counts combine exactly.

  `suppressed_M` / `controller`: optional prototype interventions (prism_jax.control).
  """

  def eval_step(params, batch: dict):
    out = lm.forward(graphdef, params, batch, suppressed_M, controller=controller)
    mask = batch["loss_mask"].astype(jnp.float32)
    per_token = optax.softmax_cross_entropy_with_integer_labels(out.logits, batch["targets"])
    sums = {"loss_sum": jnp.sum(per_token * mask), "tokens": jnp.sum(mask)}
    if out.prototypes is not None:
      sums["usage"] = losses.usage_counts(out.prototypes.activations, mask)
    return sums

  return eval_step


@dataclasses.dataclass
class CompiledSteps:
  """Everything needed to run a config on a mesh."""
  mesh: jax.sharding.Mesh
  graphdef: Any
  state_sharding: Any
  batch_sharding: NamedSharding
  init: Callable[[], TrainState]
  train_step: Callable
  eval_step: Callable
  abstract_state: TrainState


def abstract_params(cfg: ExperimentConfig):
  """(graphdef, abstract parameters, their PartitionSpecs) from the logical names."""
  graphdef, abstract_state = lm.abstract_model(cfg)
  specs = sharding.param_specs(abstract_state, cfg.mesh.rules)
  return graphdef, nnx.to_pure_dict(abstract_state), specs


def state_shardings(cfg: ExperimentConfig, mesh, tx):
  """(graphdef, abstract TrainState, its NamedShardings) from logical names on parameters."""
  graphdef, params_abstract, param_specs = abstract_params(cfg)
  abstract_opt = jax.eval_shape(tx.init, params_abstract)
  # Optimizer moments mirror the parameters; counters are replicated.
  opt_specs = optax.tree_map_params(tx, lambda _, spec: spec, abstract_opt, param_specs,
                                    transform_non_params=lambda _: P(),
                                    is_leaf=lambda x: isinstance(x, P))
  specs = TrainState(step=P(), params=param_specs, opt_state=opt_specs, nonfinite_streak=P(),
                     nonfinite_total=P())
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  abstract = TrainState(step=scalar, params=params_abstract, opt_state=abstract_opt,
                        nonfinite_streak=scalar, nonfinite_total=scalar)
  return graphdef, abstract, sharding.named(mesh, specs)


def compile_steps(cfg: ExperimentConfig, mesh) -> CompiledSteps:
  tx = make_optimizer(cfg.optimizer, cfg.train.steps)
  graphdef, abstract, state_sh = state_shardings(cfg, mesh, tx)
  batch_sh = NamedSharding(mesh, sharding.logical_to_spec(("batch", "length"),
                                                          dict(cfg.mesh.rules)))

  def init():
    _, params = lm.init(cfg, cfg.train.seed)
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=tx.init(params), nonfinite_streak=zero,
                      nonfinite_total=zero)

  rules = cfg.mesh.rules

  def in_context(fn):
    # Steps trace lazily; run them under the mesh and rules whatever the caller's context.
    def wrapped(*args):
      with jax.set_mesh(mesh), sharding.use_rules(rules):
        return fn(*args)
    return wrapped

  batch_shardings = {k: batch_sh for k in BATCH_KEYS}
  train_step = jax.jit(make_train_step(graphdef, cfg, tx),
                       in_shardings=(state_sh, batch_shardings),
                       out_shardings=(state_sh, None), donate_argnums=(0,))
  eval_step = jax.jit(make_eval_step(graphdef, cfg),
                      in_shardings=(state_sh.params, batch_shardings))
  return CompiledSteps(mesh=mesh, graphdef=graphdef, state_sharding=state_sh,
                       batch_sharding=batch_sh,
                       init=in_context(jax.jit(init, out_shardings=state_sh)),
                       train_step=in_context(train_step), eval_step=in_context(eval_step),
                       abstract_state=abstract)


def to_global_batch(local_batch: dict, batch_sharding) -> dict:
  """Host-local numpy batch -> global jax arrays laid out on the mesh."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, local_batch[k])
          for k in BATCH_KEYS}
