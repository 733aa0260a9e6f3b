"""A train step on a mesh splitting data and model axes equals the single-device step."""

import dataclasses
import functools

import chex
import jax
import numpy as np
import pytest

from prism_jax import sharding
from prism_jax.config import MeshConfig
from prism_jax.step import compile_steps, to_global_batch
from tests.synthetic import random_batch, tiny_config


def _run(cfg, mesh_shape, steps=2):
  cfg = dataclasses.replace(cfg, mesh=MeshConfig(*mesh_shape))
  devices = jax.devices()[:int(np.prod(mesh_shape))]
  compiled = compile_steps(cfg, sharding.make_mesh(cfg.mesh, devices))
  state = compiled.init()
  losses = []
  for i in range(steps):
    batch = to_global_batch(random_batch(cfg, seed=i), compiled.batch_sharding)
    state, metrics = compiled.train_step(state, batch)
    losses.append(float(metrics["loss/total"]))
  return losses, jax.device_get(state.params), state


@functools.lru_cache(maxsize=None)
def _unsharded(exp, overrides):
  losses, params, _ = _run(tiny_config(*overrides, exp=exp), (1, 1, 1))
  return losses, params


# (data, fsdp, model): all data, data x model both ways, all model, and all three axes.
MESHES = [(8, 1, 1), (4, 1, 2), (2, 1, 4), (1, 1, 8), (2, 2, 2)]


@pytest.mark.parametrize("exp, mesh_shape", [("prism_tiny", m) for m in MESHES]
                         + [("dense_tiny", m) for m in ((4, 1, 2), (1, 1, 8), (2, 2, 2))])
def test_sharded_step_equals_unsharded(exp, mesh_shape):
  # Heads live on the model axis: an 8-way model axis needs 8 of them.
  overrides = ("model.num_heads=8",) if mesh_shape[2] == 8 else ()
  cfg = tiny_config(*overrides, exp=exp)
  ref_losses, ref_params = _unsharded(exp, overrides)
  losses, params, state = _run(cfg, mesh_shape)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  chex.assert_trees_all_close(params, ref_params, rtol=1e-4, atol=1e-6)
  if exp == "prism_tiny":  # the bank really is split over the model axis
    keys = state.params["prototype_head"]["keys"]
    assert keys.sharding.spec[0] == "model"
    assert len(keys.addressable_shards) == int(np.prod(mesh_shape))
    assert keys.addressable_shards[0].data.shape[0] == 32 // mesh_shape[2]


def test_mesh_errors_are_one_line():
  with pytest.raises(Exception, match="needs 16 devices, found 8"):
    sharding.make_mesh(MeshConfig(data=4, fsdp=2, model=2))
  with pytest.raises(Exception, match="at most one of"):
    sharding.make_mesh(MeshConfig(data=-1, fsdp=-1, model=2))
