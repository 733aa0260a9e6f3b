"""Every registered experiment builds; large ones are sized by eval_shape, never allocated."""

import jax
import pytest
from flax import nnx

import experiments
from prism_jax.models import lm


def _param_count(cfg):
  _, abstract = lm.abstract_model(cfg)
  return lm.count_params(nnx.to_pure_dict(abstract))


@pytest.mark.parametrize("name, low, high", [
    ("prism_130m", 120e6, 140e6),
    ("prism_350m", 340e6, 400e6),
    ("prism_1b", 1.55e9, 1.70e9),
    ("dense_1b", 1.50e9, 1.60e9),
])
def test_large_configs_have_the_advertised_size(name, low, high):
  count = _param_count(experiments.get(name))
  assert low <= count <= high, f"{name}: {count / 1e6:.1f}M parameters"


def test_prism_1b_has_16384_prototypes_and_a_dense_twin():
  prism, dense = experiments.get("prism_1b"), experiments.get("dense_1b")
  assert prism.prototypes.num_prototypes == 16384
  assert dense.model.head == "dense" and prism.model.head == "prism"
  bank = 2 * prism.prototypes.num_prototypes * prism.model.d_model + 1
  assert _param_count(prism) - _param_count(dense) == bank


@pytest.mark.parametrize("name", experiments.names())
def test_every_experiment_builds_abstractly(name):
  cfg = experiments.get(name)
  graphdef, abstract = lm.abstract_model(cfg)
  leaves = jax.tree.leaves(nnx.to_pure_dict(abstract))
  assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
