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

from prism_jax import diagnostics, losses, sharding
from prism_jax.config import ExperimentConfig
from prism_jax.models import lm, prism_head
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


def initial_keys(cfg: ExperimentConfig):
  """The prototype keys as `lm.init` drew them for this run's seed, recomputed rather than
  stored: inside the jitted step XLA keeps only the keys' random draw of the whole init."""
  return lm.init(cfg, cfg.train.seed)[1]["prototype_head"]["keys"]


def update_head_state(params, usage_M, hidden_BxLxD, mask_BxL, step, cfg: ExperimentConfig):
  """Head updates made outside the gradient, after the optimizer: key renormalisation,
  dead-prototype revival, the selection-only balancing bias and the running statistics of h
  that whiten the scores. (params, metrics)."""
  pc = cfg.prototypes
  head = dict(params["prototype_head"])
  metrics = {}
  if pc.revive_after:
    used = usage_M > 0
    idle = jnp.where(used, 0.0, head["idle_steps"] + 1.0)
    dead = idle >= pc.revive_after
    # Each revived key becomes a random real token's hidden state of this batch, at the
    # keys' initial scale (h is RMS-normalised, norm about sqrt(D)).
    d = hidden_BxLxD.shape[-1]
    h_NxD = jax.lax.stop_gradient(hidden_BxLxD).reshape(-1, d).astype(jnp.float32)
    if pc.whiten_rate:  # the keys live where they score: among the whitened states
      h_NxD = (h_NxD - head["hidden_mean"]) @ head["whitening"]
    mask_N = mask_BxL.reshape(-1).astype(jnp.float32)
    rng = jax.random.fold_in(jax.random.key(cfg.train.seed), step)
    pick_M = jax.random.categorical(rng, jnp.log(mask_N + 1e-30), shape=usage_M.shape)
    fresh = pc.key_init_std * h_NxD[pick_M]
    head["keys"] = jnp.where(dead[:, None], fresh.astype(head["keys"].dtype), head["keys"])
    head["idle_steps"] = jnp.where(dead, 0.0, idle)
    metrics["prototypes/revived"] = jnp.sum(dead)
  if pc.key_renorm:
    head["keys"] = prism_head.renormalise_keys(head["keys"], pc,
                                               head["keys"].shape[-1]).astype(head["keys"].dtype)
  if pc.whiten_rate:
    rate = pc.whiten_rate
    mask_N = mask_BxL.reshape(-1).astype(jnp.float32)
    h_NxD = jax.lax.stop_gradient(hidden_BxLxD).reshape(-1, hidden_BxLxD.shape[-1])
    h_NxD = h_NxD.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(mask_N), 1.0)
    batch_mean = jnp.sum(h_NxD * mask_N[:, None], axis=0) / count
    head["hidden_mean"] = head["hidden_mean"] + rate * (batch_mean - head["hidden_mean"])
    centred = (h_NxD - batch_mean) * mask_N[:, None]
    batch_cov = centred.T @ centred / count
    head["hidden_cov"] = head["hidden_cov"] + rate * (batch_cov - head["hidden_cov"])
    head["whitening"] = prism_head.whitening_matrix(head["hidden_cov"], pc.whiten_shrinkage)
  if pc.selection_bias_rate:
    # Loss-free balancing: raise the bias of under-used prototypes, lower over-used ones.
    load = usage_M.astype(jnp.float32)
    head["selection_bias"] = head["selection_bias"] + pc.selection_bias_rate * jnp.sign(
        jnp.mean(load) - load)
  return {**params, "prototype_head": head}, metrics


def make_train_step(graphdef, cfg: ExperimentConfig, tx: optax.GradientTransformation):
  schedule = learning_rate_schedule(cfg.optimizer, cfg.train.steps)
  prism = cfg.model.head == "prism"

  def train_step(state: TrainState, batch: dict):
    def objective(params):
      out = lm.forward(graphdef, params, batch, training=True)
      mask = batch["loss_mask"].astype(jnp.float32)
      # one summary of the head's [N, M] tensors for the losses and the diagnostics
      summary = losses.summarise_output(out, mask, prototype_keys(params), cfg.losses,
                                        cfg.prototypes.similarity)
      loss, metrics = losses.total_loss(out, batch, prototype_keys(params), cfg.losses,
                                        cfg.prototypes.top_k, cfg.prototypes.similarity,
                                        state.step, summary)
      if not prism:
        return loss, (metrics, None)
      usage = losses.usage_counts(summary.top_values, summary.top_indices, mask,
                                  cfg.prototypes.num_prototypes)
      cosine = cfg.prototypes.similarity in ("cosine", "dot")  # distances are 1 - cos
      scored = None if out.prototypes is None else out.prototypes.scored_hidden
      metrics.update(diagnostics.head_diagnostics(
          out.hidden if scored is None else scored, summary.top_values, usage, mask,
          prototype_keys(params), None, 1.0 - summary.nearest_distance_N if cosine else None))
      # Redrawing the initial keys was about 1.5% of prism_tiny's step in an XLA:CPU profile:
      # only on the steps the loop logs (it reports state.step + 1); NaN on the others.
      done = state.step + 1
      metrics["prototypes/key_drift_cos"] = jax.lax.cond(
          (done % cfg.train.log_every == 0) | (done == cfg.train.steps),
          lambda: diagnostics.key_drift_cos(jax.lax.stop_gradient(prototype_keys(params)),
                                            initial_keys(cfg)),
          lambda: jnp.float32(jnp.nan))
      return loss, (metrics, (usage, jax.lax.stop_gradient(out.hidden)))

    (loss, (metrics, head_aux)), grads = jax.value_and_grad(objective, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if prism:
      params, head_metrics = update_head_state(params, *head_aux, batch["loss_mask"],
                                               state.step, cfg)
      metrics.update(head_metrics)
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
      sums["usage"] = losses.usage_counts(out.prototypes.top_values, out.prototypes.top_indices,
                                          mask, cfg.prototypes.num_prototypes)
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
