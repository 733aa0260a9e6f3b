"""prism_jax.main.plan: counts from eval_shape, shard bytes from the real rules, one-line errors."""

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
from prism_jax.main import plan as plan_cli
from prism_jax.config import MeshConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(exp, *overrides):
  return config_lib.apply_overrides(experiments.get(exp), list(overrides))


def _hand_count(cfg) -> int:
  """Parameters by formula: embeddings, per layer attention (q, k, v, o: d x d each), gated
  MLP (3 d x f) and two norms, the final norm, and (PRISM) keys + values + temperature."""
  m = cfg.model
  d, f, v = m.d_model, m.d_ff, m.vocab_size
  count = v * d * (1 if m.tie_embeddings else 2) + d
  count += m.num_layers * (4 * d * d + 3 * d * f + 2 * d)
  if m.head == "prism":
    count += 2 * cfg.prototypes.num_prototypes * d + 1
  return count


@pytest.mark.parametrize("exp", experiments.names())
def test_parameter_count_matches_the_formula(exp):
  cfg = _cfg(exp)
  result = plan.make_plan(cfg, plan.parse_topology("64"))
  assert result.num_params == _hand_count(cfg)
  # Bytes: every parameter in param_dtype, except the float32 temperature.
  itemsize = jax.numpy.dtype(cfg.model.param_dtype).itemsize
  temperature = 1 if cfg.model.head == "prism" else 0
  assert result.param_bytes_total == ((result.num_params - temperature) * itemsize
                                      + 4 * temperature)


def test_hand_count_sees_untied_embeddings():
  cfg = _cfg("prism_tiny", "model.tie_embeddings=false")
  result = plan.make_plan(cfg, plan.parse_topology("8"))
  assert result.num_params == _hand_count(cfg) == _hand_count(_cfg("prism_tiny")) + (
      cfg.model.vocab_size * cfg.model.d_model)


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
    plan_cli.main(list(argv))
  return exit_info.value.code, capsys.readouterr()


def test_impossible_config_one_line_error():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "prism_jax.main.plan", "--exp", "prism_1b",
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
    plan_cli.main(["--exp", "prism_1b", "--topology", topology, "--no-compile"])
    assert f"mesh         {mesh} model=1" in capsys.readouterr().out


def test_fitting_plan_prints_verdict(capsys):
  plan_cli.main(["--exp", "prism_1b", "--topology", "v5p-64", "--no-compile"])
  out = capsys.readouterr().out
  assert "mesh         data=1 fsdp=32 model=1" in out
  assert "tokens/step  1,048,576" in out and "verdict      fits" in out


def test_unknown_hbm_gives_no_verdict(capsys):
  plan_cli.main(["--exp", "prism_tiny", "--devices", "8"])
  assert "verdict      unknown" in capsys.readouterr().out


def test_remat_policy_orders_activation_memory():
  def activations(remat):
    cfg = dataclasses.replace(_cfg("prism_130m"), name=remat)
    cfg = config_lib.apply_overrides(cfg, [f"model.remat={remat}"])
    return plan.make_plan(cfg, plan.parse_topology("v5p-64")).activation_bytes
  assert activations("full") < activations("dots") < activations("none")


# ------------------------------------------------------------------------------------------
# Plans proven by compilation (prism_jax.aot): XLA:TPU compiles the real steps on this CPU.


def _require_libtpu():
  """A skip on a developer's machine without the tpu-plan extra; a failure in CI (CI=true:
  `make test` installs it, so CI never skips)."""
  from prism_jax import aot
  if not aot.libtpu_available():
    reason = "libtpu is not installed (pip install -e '.[tpu-plan]')"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
      pytest.fail(f"{reason} (CI=true: a missing test dependency fails, never skips)")
    pytest.skip(reason)


# prism_tiny on a 2x2x2 mesh of a v5e-8 slice: the topology of the partition-spec golden.
TINY_TPU = ("prism_tiny", "v5e-8", ("mesh.data=2", "mesh.fsdp=2", "mesh.model=2"))


@pytest.fixture(scope="module")
def tiny_compiled():
  """prism_tiny's train step compiled for v5e-8 (one compile, ~10-25 s on two cores)."""
  _require_libtpu()
  from prism_jax import aot
  exp, topology, overrides = TINY_TPU
  cfg = _cfg(exp, *overrides)
  topology = plan.parse_topology(topology)
  return cfg, topology, aot.compile_for_topology(cfg, topology, steps=("train",))


def test_tpu_topology_names():
  from prism_jax import aot
  names = {t: aot.tpu_topology_name(plan.parse_topology(t))
           for t in ["v5p-8", "v5p-16", "v5p-128", "v5p-256", "v4-32", "v5e-8", "v5e-256",
                     "v6e-64", "v5litepod-1"]}
  assert names == {"v5p-8": "v5p:2x2x1", "v5p-16": "v5p:2x2x2", "v5p-128": "v5p:4x4x4",
                   "v5p-256": "v5p:4x4x8", "v4-32": "v4:2x2x4", "v5e-8": "v5e:2x4",
                   "v5e-256": "v5e:16x16", "v6e-64": "v6e:8x8", "v5litepod-1": "v5e:1x1"}
  assert not aot.is_tpu_topology(plan.parse_topology("h100-8"))


def test_train_step_compiles_for_a_tpu_topology(tiny_compiled):
  cfg, topology, (train,) = tiny_compiled
  estimate = plan.make_plan(cfg, topology)
  assert train.name == "train" and train.error is None
  assert train.mesh == {"data": 2, "fsdp": 2, "model": 2}
  m = train.memory
  # Arguments: the sharded train state (what the plan sums leaf by leaf) + the batch, and
  # TPU tiling pads small minor dimensions (prism_tiny's are small: ~25% more here).
  state = estimate.params_per_device + estimate.optimizer_per_device
  batch_bytes = 5 * 4 * cfg.data.batch_size * cfg.data.seq_len // 4  # 4 batch shards
  assert state <= m.arguments <= 1.5 * (state + batch_bytes)
  # The state is donated: its buffers are reused for the new state.
  assert state <= m.aliased <= m.arguments
  assert m.temps > 0 and m.code > 0
  assert m.total == m.arguments + m.outputs - m.aliased + m.temps + m.code
  assert m.total < topology.hbm_gib * plan.GIB
  # Within a factor of the arithmetic estimate (which has no XLA fusion or scheduling).
  assert 0.2 < m.total / estimate.total_per_device < 5
  # Forward + backward of every token: at least 6 x params x tokens / devices.
  tokens = cfg.data.batch_size * cfg.data.seq_len
  assert train.flops > 6 * estimate.num_params * tokens / topology.devices


def test_eval_and_index_steps_compile_for_a_tpu_topology():
  """The eval step and the index pass (on the run's 2x2x2 mesh, the bank on its axis)
  compile for the same slice, each well inside a chip."""
  _require_libtpu()
  from prism_jax import aot
  exp, topology, overrides = TINY_TPU
  cfg = _cfg(exp, *overrides)
  topology = plan.parse_topology(topology)
  compiled = aot.compile_for_topology(cfg, topology, steps=("eval", "index"))
  assert [c.name for c in compiled] == ["eval", "index"]
  for step in compiled:
    assert step.error is None and step.mesh == {"data": 2, "fsdp": 2, "model": 2}
    assert 0 < step.memory.total < topology.hbm_gib * plan.GIB
    assert step.flops > 0


def test_compiled_partition_specs_match_golden(tiny_compiled):
  """What XLA:TPU was asked to compile for each parameter == the checked-in golden specs."""
  import json
  import pathlib
  _, _, (train,) = tiny_compiled
  (state_shardings, batch_shardings), _ = train.compiled.input_shardings
  flat = jax.tree_util.tree_flatten_with_path(state_shardings.params)[0]
  got = {jax.tree_util.keystr(path): str(s.spec) for path, s in flat}
  golden = pathlib.Path(ROOT) / "tests" / "golden" / "param_specs_prism_tiny_2x2x2.json"
  assert got == json.loads(golden.read_text())
  batch_spec = sharding.logical_to_spec(("batch", "length"), dict(_cfg("prism_tiny").mesh.rules))
  assert {s.spec for s in batch_shardings.values()} == {batch_spec}
  # The new state leaves the step laid out as it came in.
  out_state, _ = train.compiled.output_shardings
  assert jax.tree.map(lambda s: str(s.spec), out_state.params) == jax.tree.map(
      lambda s: str(s.spec), state_shardings.params)


def test_plan_main_prints_compiled_memory_and_verdict(tiny_compiled, capsys, monkeypatch):
  from prism_jax import aot
  _, _, results = tiny_compiled
  monkeypatch.setattr(aot, "compile_for_topology", lambda *a, **k: results)
  exp, topology, overrides = TINY_TPU
  plan_cli.main(["--exp", exp, "--topology", topology, *overrides])
  out = capsys.readouterr().out
  assert "estimate     fits" in out and "compiled for v5e:2x4" in out
  assert "TFLOP per step" in out and "verdict      fits (compiled)" in out


def test_plan_does_not_fit_by_the_compiled_figure(tiny_compiled, capsys, monkeypatch):
  from prism_jax import aot
  _, _, results = tiny_compiled
  monkeypatch.setattr(aot, "compile_for_topology", lambda *a, **k: results)
  exp, topology, overrides = TINY_TPU
  tiny_hbm = results[0].memory.total / plan.GIB / 2
  code, out = _run_main(capsys, "--exp", exp, "--topology", topology, "--hbm-gib",
                        str(tiny_hbm), *overrides)
  assert code == 2 and "verdict      does not fit (compiled)" in out.out
  line, = out.err.strip().splitlines()
  assert "does not fit: the compiled train step needs" in line


def test_without_libtpu_plan_prints_the_estimate_and_how_to_install(capsys, monkeypatch):
  from prism_jax import aot
  monkeypatch.setattr(aot, "libtpu_available", lambda: False)
  plan_cli.main(["--exp", "prism_tiny", "--topology", "v5e-8"])  # returns: exit status 0
  out = capsys.readouterr().out
  assert "verdict      fits" in out
  assert out.strip().splitlines()[-1] == aot.INSTALL_HINT
  assert "pip install -e '.[tpu-plan]'" in aot.INSTALL_HINT


def test_libtpu_held_by_another_process_is_one_line(capsys, monkeypatch):
  """libtpu loads in one process at a time (/tmp/libtpu_lockfile): a second plan, or a plan
  beside a training run on a TPU VM, gets a line saying so, not JAX's traceback."""
  import jax
  from jax.experimental import topologies

  from prism_jax import aot

  def held(*args, **kwargs):
    raise jax.errors.JaxRuntimeError("ABORTED: Internal error when accessing libtpu "
                                     "multi-process lockfile. Run \"$ sudo rm "
                                     "/tmp/libtpu_lockfile\".")

  monkeypatch.setattr(aot, "libtpu_available", lambda: True)
  monkeypatch.setattr(topologies, "get_topology_desc", held)
  with pytest.raises(SystemExit) as exit_info:
    plan_cli.main(["--exp", "prism_tiny", "--topology", "v5e-8"])
  line, = capsys.readouterr().err.strip().splitlines()
  assert exit_info.value.code == 2
  assert line.startswith("error: libtpu is in use by another process on this machine")


def test_out_of_memory_message_is_parsed():
  from prism_jax import aot
  text = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
          "temporaries (106.29G) exceeds available HBM (95.74G).")  # prism_350m on v5p-8
  assert aot._oom_bytes(text) == int(106.29 * 2**30)
  text = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
          "space hbm. Used 19.51G of 15.75G hbm. Exceeded hbm capacity by 3.76G.")
  assert aot._oom_bytes(text) == int(19.51 * 2**30)


POD_SCALE = [name for name in experiments.names() if not name.endswith(("_tiny", "_small"))]


@pytest.mark.parametrize("exp", POD_SCALE)
def test_pod_scale_experiments_name_a_topology_that_divides(exp):
  topology = plan.planned_topology(exp)
  assert topology and plan.is_tpu_accelerator(topology), exp
  result = plan.make_plan(_cfg(exp), plan.parse_topology(topology))
  assert not result.problems, result.problems


def test_plan_without_topology_uses_the_planned_one(capsys):
  plan_cli.main(["--exp", "prism_1b", "--no-compile"])
  out = capsys.readouterr().out
  assert f"prism_1b on {plan.planned_topology('prism_1b')} (" in out
  assert "verdict      fits" in out
