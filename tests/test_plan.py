"""prism_jax.plan: counts from eval_shape, shard bytes from the real rules, one-line errors."""

import dataclasses
import math
import os
import subprocess
import sys

import jax
import pytest
from jax.sharding import AbstractMesh, AxisType, NamedSharding

import experiments
from prism_jax import config as config_lib, plan, sharding
from prism_jax.config import MeshConfig
from prism_jax.models import lm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(exp, *overrides):
  return config_lib.apply_overrides(experiments.get(exp), list(overrides))


@pytest.mark.parametrize("exp", experiments.names())
def test_parameter_count_matches_eval_shape(exp):
  cfg = _cfg(exp)
  result = plan.make_plan(cfg, plan.parse_topology("64"))
  params = jax.eval_shape(lambda: lm.init(cfg, 0)[1])
  assert result.num_params == lm.count_params(params)
  assert result.param_bytes_total == sum(x.size * x.dtype.itemsize
                                         for x in jax.tree.leaves(params))


def test_fully_fsdp_sharded_leaves_divide_by_devices():
  cfg = _cfg("prism_tiny", "mesh.data=1", "mesh.fsdp=-1")
  result = plan.make_plan(cfg, plan.parse_topology("8"))
  assert result.mesh == {"data": 1, "fsdp": 8, "model": 1}
  assert result.params_per_device * 8 >= result.param_bytes_total
  sharded = [leaf for leaf in result.leaves if "fsdp" in str(leaf.spec)]
  assert sharded, "expected FSDP-sharded parameters"
  for leaf in sharded:
    local = math.prod(plan.shard_shape(leaf.shape, leaf.spec, result.mesh)) * leaf.itemsize
    assert local * 8 == math.prod(leaf.shape) * leaf.itemsize, leaf.path
  # Adam's two moments mirror the parameters (plus replicated counters).
  assert 2 * result.params_per_device <= result.optimizer_per_device
  assert result.optimizer_per_device <= 2 * result.params_per_device + 64


def test_shard_shapes_agree_with_named_sharding_on_256_abstract_devices():
  cfg = _cfg("prism_1b", "mesh.data=2", "mesh.fsdp=-1", "mesh.model=2", "model.num_heads=32")
  result = plan.make_plan(cfg, plan.parse_topology("v5p-512"))
  assert result.mesh == {"data": 2, "fsdp": 64, "model": 2} and not result.problems
  mesh = AbstractMesh((2, 64, 2), plan.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  for leaf in result.leaves:
    expected = NamedSharding(mesh, leaf.spec).shard_shape(leaf.shape)
    assert plan.shard_shape(leaf.shape, leaf.spec, result.mesh) == expected, leaf.path
  assert result.params_per_device * 256 >= result.param_bytes_total


@pytest.mark.parametrize("mesh_cfg", [MeshConfig(), MeshConfig(data=2, fsdp=-1, model=2),
                                      MeshConfig(data=1, fsdp=1, model=-1)])
def test_resolve_mesh_agrees_with_make_mesh(mesh_cfg):
  assert plan.resolve_mesh(mesh_cfg, 8) == dict(sharding.make_mesh(mesh_cfg).shape)


@pytest.mark.parametrize("text, devices, hbm", [
    ("v5p-64", 32, 95), ("v4-32", 16, 32), ("v5litepod-16", 16, 16), ("v5e-8", 8, 16),
    ("v6e-256", 256, 32), ("h100-16", 16, 80), ("a100-8", 8, 80), ("256", 256, None)])
def test_topology_table(text, devices, hbm):
  topology = plan.parse_topology(text)
  assert (topology.devices, topology.hbm_gib) == (devices, hbm)


@pytest.mark.parametrize("text", ["v5p-60", "v5litepod-2", "tpu-8", "0"])
def test_bad_topology_is_a_user_error(text):
  with pytest.raises(plan.PlanError):
    plan.parse_topology(text)


def _run_main(capsys, *argv):
  with pytest.raises(SystemExit) as exit_info:
    plan.main(list(argv))
  return exit_info.value.code, capsys.readouterr()


def test_impossible_config_one_line_error():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "prism_jax.plan", "--exp", "prism_1b",
                         "--devices", "1", "--hbm-gib", "16", "mesh.fsdp=1"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: prism_1b"), proc.stderr
  assert "does not fit" in lines[0] and "16 GiB" in lines[0]
  assert "parameters   1,6" in proc.stdout


def test_divisibility_error_names_the_dimension(capsys):
  code, out = _run_main(capsys, "--exp", "prism_1b", "--topology", "v5p-64", "mesh.fsdp=16", "mesh.model=2")
  assert code == 2
  line, = out.err.strip().splitlines()
  assert "model.num_heads=25" in line and "'heads'" in line and "model=2" in line
  assert "try mesh.data=1 mesh.fsdp=32 mesh.model=1" in line


def test_batch_divisibility_error(capsys):
  code, out = _run_main(capsys, "--exp", "prism_tiny", "--devices", "8", "data.batch_size=12")
  assert code == 2
  assert "data.batch_size=12 is not divisible by the 8 batch shards" in out.err


def test_uneven_fsdp_suggests_a_mesh(capsys):
  code, out = _run_main(capsys, "--exp", "prism_1b", "--topology", "v5p-256", "mesh.data=1",
                        "mesh.fsdp=-1")
  assert code == 2
  assert "model.d_model=1600" in out.err and "try mesh.data=2 mesh.fsdp=64" in out.err


def test_prism_1b_default_mesh_divides_64_and_256_chip_slices(capsys):
  for topology, mesh in [("v5p-64", "data=1 fsdp=32"), ("v5p-256", "data=4 fsdp=32")]:
    plan.main(["--exp", "prism_1b", "--topology", topology])
    assert f"mesh         {mesh} model=1" in capsys.readouterr().out


def test_fitting_plan_prints_verdict(capsys):
  plan.main(["--exp", "prism_1b", "--topology", "v5p-64"])
  out = capsys.readouterr().out
  assert "mesh         data=1 fsdp=32 model=1" in out
  assert "tokens/step  1,048,576" in out and "verdict      fits" in out


def test_unknown_hbm_gives_no_verdict(capsys):
  plan.main(["--exp", "prism_tiny", "--devices", "8"])
  assert "verdict      unknown" in capsys.readouterr().out


def test_remat_policy_orders_activation_memory():
  def activations(remat):
    cfg = dataclasses.replace(_cfg("prism_130m"), name=remat)
    cfg = config_lib.apply_overrides(cfg, [f"model.remat={remat}"])
    return plan.make_plan(cfg, plan.parse_topology("v5p-64")).activation_bytes
  assert activations("full") < activations("dots") < activations("none")
