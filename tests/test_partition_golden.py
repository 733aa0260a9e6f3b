"""Every parameter's partition spec per fake topology, against a checked-in golden file.

A change to the rules table or to a parameter's logical names shows up here as a diff.
Regenerate deliberately with: PRISM_UPDATE_GOLDEN=1 python -m pytest tests/test_partition_golden.py
"""

import dataclasses
import json
import os
import pathlib

import jax
import pytest

import experiments
from prism_jax import sharding
from prism_jax.config import MeshConfig
from prism_jax.optim import make_optimizer
from prism_jax.step import state_shardings

GOLDEN = pathlib.Path(__file__).parent / "golden"


def _specs(exp: str, mesh_cfg: MeshConfig) -> dict:
  cfg = dataclasses.replace(experiments.get(exp), mesh=mesh_cfg)
  mesh = sharding.make_mesh(cfg.mesh)
  _, _, shardings = state_shardings(cfg, mesh, make_optimizer(cfg.optimizer, 10))
  flat = jax.tree_util.tree_flatten_with_path(shardings.params)[0]
  return {jax.tree_util.keystr(path): str(s.spec) for path, s in flat}


@pytest.mark.parametrize("exp, mesh_cfg, tag", [
    ("prism_tiny", MeshConfig(data=2, fsdp=2, model=2), "2x2x2"),
    ("prism_1b", MeshConfig(data=1, fsdp=4, model=2), "1x4x2"),
])
def test_partition_specs_match_golden(exp, mesh_cfg, tag):
  got = _specs(exp, mesh_cfg)
  path = GOLDEN / f"param_specs_{exp}_{tag}.json"
  if os.environ.get("PRISM_UPDATE_GOLDEN"):
    path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
  assert got == json.loads(path.read_text())
