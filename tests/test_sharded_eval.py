"""The evaluation step and the index pass give the same numbers sharded as on one device.

Tools run inside their run's mesh (prism_jax.run.Run); these compare the jitted eval step
(`step.compile_steps(...).eval_step`) and the index's per-token statistics on the meshes a
run can have with the single-device results, from the same parameters.
"""

import dataclasses

import chex
import jax
import numpy as np
import pytest

from prism_jax import sharding
from prism_jax.attribution import index as index_lib
from prism_jax.config import MeshConfig
from prism_jax.models import lm
from prism_jax.step import compile_steps, to_global_batch
from tests.synthetic import random_batch, tiny_config

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 1, 8)]


def _config(mesh_shape=(1, 1, 1)):
  cfg = tiny_config("model.num_heads=8", "model.num_layers=1")
  return dataclasses.replace(cfg, mesh=MeshConfig(*mesh_shape))


def _eval_sums(mesh_shape, params):
  cfg = _config(mesh_shape)
  devices = jax.devices()[:int(np.prod(mesh_shape))]
  steps = compile_steps(cfg, sharding.make_mesh(cfg.mesh, devices))
  placed = jax.device_put(params, steps.state_sharding.params)
  batch = to_global_batch(random_batch(cfg, seed=3), steps.batch_sharding)
  return jax.device_get(steps.eval_step(placed, batch))


@pytest.fixture(scope="module")
def reference():
  _, params = lm.init(_config(), seed=0)
  return params, _eval_sums((1, 1, 1), params)


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_sharded_eval_step_equals_unsharded(reference, mesh_shape):
  params, expected = reference
  got = _eval_sums(mesh_shape, params)
  np.testing.assert_allclose(got["loss_sum"], expected["loss_sum"], rtol=1e-5)
  assert got["tokens"] == expected["tokens"]
  np.testing.assert_array_equal(got["usage"], expected["usage"])  # same prototypes chosen


def test_index_statistics_are_the_same_on_one_and_eight_devices(reference):
  params, _ = reference
  cfg = _config()
  graphdef, _ = lm.abstract_model(cfg)
  batch = random_batch(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data,
                                                                         batch_size=8)), seed=5)
  one, _ = index_lib._placed(graphdef, params, jax.devices()[:1], 8)
  eight, _ = index_lib._placed(graphdef, params, jax.devices(), 1)
  chex.assert_trees_all_close(one(batch), eight(batch), rtol=1e-5, atol=1e-6)
