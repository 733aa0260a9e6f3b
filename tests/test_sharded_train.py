"""Training on a mesh that splits data, fsdp and model axes equals single-device training.

What is compared, per step, with no warm-up and a real learning rate (so every step after
the first runs at parameters the optimizer really moved): the loss, every logged loss term,
and the global gradient norm at rtol 1e-5. The gradient norm is the one number Adam and
clipping cannot hide: a gradient scaled by the data x fsdp size (a psum where a mean was
meant) leaves Adam's first update unchanged, but multiplies grad_norm by 8. The final
parameters are compared too, and the unsharded gradient norm is checked against
`jax.grad` of the loss written out directly, so a constant scale on every mesh is caught.
"""

import dataclasses
import functools
from unittest import mock

import chex
import jax
import numpy as np
import optax
import pytest

from prism_jax import losses, sharding
from prism_jax import step as step_module
from prism_jax.config import MeshConfig
from prism_jax.models import lm
from prism_jax.step import compile_steps, to_global_batch
from tests.synthetic import count_backend_compiles, random_batch, tiny_config

STEPS = 3
# No warm-up: step 0 already runs at the peak learning rate. One layer keeps compiles cheap
# (every parameter kind is still there); 8 heads let an 8-way model axis split them; top-k 6
# over 32 prototypes is more than an 8-way bank holds per shard (4), the merge's hard case.
OVERRIDES = ("optimizer.warmup_steps=0", "optimizer.learning_rate=1e-2", "model.num_layers=1",
             "model.num_heads=8", "prototypes.top_k=6")


def _config(exp):
  return tiny_config(*OVERRIDES, exp=exp)


def _run(cfg, mesh_shape, initial_state=None, steps=STEPS):
  """Trains `steps` steps on a mesh from `initial_state` (host arrays; None: the sharded
  init); returns (initial state, per-step metrics, final params, final state, traces of the
  step function, backend compiles after the first step)."""
  cfg = dataclasses.replace(cfg, mesh=MeshConfig(*mesh_shape))
  devices = jax.devices()[:int(np.prod(mesh_shape))]
  traces = []
  real_make_train_step = step_module.make_train_step

  def counting_make_train_step(*args):
    fn = real_make_train_step(*args)

    def counted(*a):  # runs only while jax traces the step
      traces.append(1)
      return fn(*a)
    return counted

  with mock.patch.object(step_module, "make_train_step", counting_make_train_step):
    compiled = compile_steps(cfg, sharding.make_mesh(cfg.mesh, devices))
  if initial_state is None:
    state = compiled.init()
  else:  # the reference's initial state, laid out on this mesh (saves an init compile)
    state = jax.device_put(initial_state, compiled.state_sharding)
  initial_state = jax.device_get(state)  # copied before the step donates it
  history = []
  batches = [to_global_batch(random_batch(cfg, seed=i), compiled.batch_sharding)
             for i in range(steps)]
  state, metrics = compiled.train_step(state, batches[0])
  history.append(jax.device_get(metrics))
  with count_backend_compiles() as compiles:
    for batch in batches[1:]:
      state, metrics = compiled.train_step(state, batch)
      history.append(jax.device_get(metrics))
  return (initial_state, history, jax.device_get(state.params), state, len(traces),
          compiles.count)


@functools.lru_cache(maxsize=None)
def _unsharded(exp):
  initial_state, history, params, _, traces, compiles = _run(_config(exp), (1, 1, 1))
  return initial_state, history, params, traces, compiles


def _assert_same_training(history, ref_history):
  """Every metric of every step: losses, each loss term, grad_norm, temperature, ..."""
  for step, (got, ref) in enumerate(zip(history, ref_history, strict=True)):
    assert got.keys() == ref.keys()
    for key in ref:
      np.testing.assert_allclose(got[key], ref[key], rtol=1e-5, atol=1e-7,
                                 err_msg=f"{key} at step {step}")


# (data, fsdp, model): all data, all fsdp (prism_1b's layout), data x model both ways, all
# model, and all three axes. The dense head shares the backbone; it runs the layouts that
# differ for it (fsdp, model, all three).
MESHES = [(8, 1, 1), (1, 8, 1), (4, 1, 2), (2, 1, 4), (1, 1, 8), (2, 2, 2)]
DENSE_MESHES = [(1, 8, 1), (1, 1, 8), (2, 2, 2)]
# Meshes that also initialise sharded (jit(init, out_shardings)); the others start from the
# unsharded initial state, placed on the mesh.
SHARDED_INIT = [(2, 2, 2)]


@pytest.mark.parametrize("exp, mesh_shape", [("prism_tiny", m) for m in MESHES]
                         + [("dense_tiny", m) for m in DENSE_MESHES])
def test_sharded_training_equals_unsharded(exp, mesh_shape):
  ref_initial, ref_history, ref_params, _, _ = _unsharded(exp)
  initial, history, params, state, traces, compiles = _run(
      _config(exp), mesh_shape, None if mesh_shape in SHARDED_INIT else ref_initial)
  chex.assert_trees_all_equal(initial, ref_initial)
  assert ref_history[0]["learning_rate"] == pytest.approx(1e-2)  # the first step really moves
  _assert_same_training(history, ref_history)
  # Adam moves each weight by about lr = 1e-2 per step whatever its gradient's size, so a
  # gradient entry that is float noise on both sides can differ by a few 1e-5 after 3 steps;
  # a wrong update moves weights by ~1e-2. atol is 1% of one step.
  chex.assert_trees_all_close(params, ref_params, rtol=1e-4, atol=1e-4)
  assert (traces, compiles) == (1, 0), "the sharded train step retraced or recompiled"
  if exp == "prism_tiny":  # the bank really is split over the model axis
    keys = state.params["prototype_head"]["keys"]
    assert keys.sharding.spec[0] == "model"
    assert len(keys.addressable_shards) == int(np.prod(mesh_shape))
    assert keys.addressable_shards[0].data.shape[0] == 32 // mesh_shape[2]


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (2, 1, 4)])
def test_the_head_in_blocks_trains_as_the_whole_head(mesh_shape):
  """prototypes.score_blocks=4 (a quarter of the length at a time, recomputed in the backward
  pass) gives the unblocked run's every metric and parameters, also with the bank split."""
  ref_initial, ref_history, ref_params, _, _ = _unsharded("prism_tiny")
  cfg = tiny_config(*OVERRIDES, "prototypes.score_blocks=4")
  _, history, params, _, _, _ = _run(cfg, mesh_shape, ref_initial)
  _assert_same_training(history, ref_history)
  chex.assert_trees_all_close(params, ref_params, rtol=1e-4, atol=1e-4)


def test_train_step_gradient_norm_is_the_loss_gradient():
  """grad_norm of the first step == |jax.grad(loss)| at the initial parameters, written
  directly (the sharded comparison alone cannot see a scale applied on every mesh)."""
  cfg = _config("prism_tiny")
  _, history, _, _, _ = _unsharded("prism_tiny")
  graphdef, params = lm.init(cfg, cfg.train.seed)
  batch = random_batch(cfg, seed=0)

  def loss_fn(p):
    out = lm.forward(graphdef, p, batch, training=True)  # the train step's own objective
    return losses.total_loss(out, batch, p["prototype_head"]["keys"], cfg.losses,
                             cfg.prototypes.top_k)

  (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  np.testing.assert_allclose(history[0]["loss/total"], loss, rtol=1e-5)
  np.testing.assert_allclose(history[0]["grad_norm"], optax.tree.norm(grads), rtol=1e-5)


def test_train_step_traces_and_compiles_once():
  """After the first step, the jitted train step neither retraces nor recompiles."""
  for exp in ("prism_tiny", "dense_tiny"):
    _, _, _, traces, compiles = _unsharded(exp)
    assert traces == 1, f"{exp}: the train step was traced {traces} times in {STEPS} steps"
    assert compiles == 0, f"{exp}: {compiles} backend compiles after the first step"


def test_mesh_errors_are_one_line():
  with pytest.raises(Exception, match="needs 16 devices, found 8"):
    sharding.make_mesh(MeshConfig(data=4, fsdp=2, model=2))
  with pytest.raises(Exception, match="at most one of"):
    sharding.make_mesh(MeshConfig(data=-1, fsdp=-1, model=2))
