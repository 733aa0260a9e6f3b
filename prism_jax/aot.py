"""Ahead-of-time compilation of the real steps for a TPU topology, on a CPU-only machine.

  steps = aot.compile_for_topology(cfg, plan.parse_topology("v5p-128"))
  for s in steps: print(s.name, s.memory.total, s.flops, s.seconds)

The TPU runtime (`libtpu`, the release jax pins: 0.0.42.x for jax 0.10.2; install with
`pip install -e '.[tpu-plan]'`) describes a slice it is not running on
(`jax.experimental.topologies.get_topology_desc`), which gives compile-only devices. A mesh
made from them (`sharding.make_mesh`, the same device order a run uses) takes the
NamedShardings `step.state_shardings` builds from the config's rules; each step is then
`jax.jit(step, in_shardings, out_shardings).lower(abstract inputs).compile()` -- XLA:TPU's
own partitioner, scheduler and buffer assignment -- and `compiled.memory_analysis()` says what
each device holds (arguments + outputs - donated + temporaries + code: XLA:TPU's own
compile-time check counts the temporaries only, so a step can compile and still not fit).
Nothing is allocated and no TPU is needed.

Steps compiled:
  train  `step.make_train_step`, jitted exactly as `step.compile_steps` does (state donated).
  eval   `step.make_eval_step`, parameters as the train state lays them out.
  index  `attribution.index._token_stats`, the jitted function of the index pass, laid out as
         `index._placed` runs it: a data-parallel mesh over every device, parameters
         replicated, `attr.batch_size` rows per device (PRISM heads only).

FLOPs: `compiled.cost_analysis()` counts the body of a `lax.scan` (and of the scanned
backward) once. With `model.scan_layers` we add (N - 1) x one layer's forward+backward
FLOPs, taken from the cost analysis of that layer lowered on its own (the same remat
policy, the per-device share: global / devices). `flops_scan_body_once` keeps the raw figure.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import time
from typing import Callable

from prism_jax.plan import GIB, PlanError, Topology, resolve_mesh

LIBTPU_PIN = "libtpu==0.0.42.1"
INSTALL_HINT = ("compiled check skipped: libtpu is not installed; to compile the steps for "
                "this topology on CPU run: pip install -e '.[tpu-plan]'")
STEPS = ("train", "eval", "index")


def libtpu_available() -> bool:
  """libtpu importable (without importing it: that would start the TPU runtime)."""
  return importlib.util.find_spec("libtpu") is not None


# ------------------------------------------------------------------------------------------
# Topologies: our names (v5p-128) -> libtpu's ("v5p:4x4x4")

# Chip-grid dimensionality and libtpu's name prefix per family.
_TPU_FAMILIES = {"v4": ("v4", 3), "v5p": ("v5p", 3), "v5litepod": ("v5e", 2), "v6e": ("v6e", 2)}


def chip_grid(chips: int, dims: int) -> tuple[int, ...]:
  """The slice's chip grid: as cubic/square as the count allows, ascending (2x2x1 for 4)."""
  if dims == 3 and chips < 8:
    return {1: (1, 1, 1), 2: (1, 2, 1), 4: (2, 2, 1)}[chips]
  best = None
  for a in range(1, chips + 1):
    if chips % a:
      continue
    rest = chips // a
    for b in range(a, rest + 1) if dims == 3 else [rest]:
      if rest % b:
        continue
      grid = (a, b, rest // b) if dims == 3 else (a, rest)
      if list(grid) != sorted(grid):
        continue
      if best is None or (max(grid), -min(grid)) < (max(best), -min(best)):
        best = grid
  return best


def tpu_topology_name(topology: Topology) -> str:
  """libtpu's name of a slice, e.g. v5p-128 (64 chips) -> 'v5p:4x4x4'."""
  family = _family(topology)
  if family not in _TPU_FAMILIES:
    raise PlanError(f"{topology.name} is not a TPU slice: compiling for it needs a TPU topology "
                    f"({', '.join(f + '-N' for f in _TPU_FAMILIES)})")
  prefix, dims = _TPU_FAMILIES[family]
  return f"{prefix}:{'x'.join(map(str, chip_grid(topology.devices, dims)))}"


def _family(topology: Topology) -> str | None:
  from prism_jax.plan import ALIASES
  match = re.fullmatch(r"([a-z0-9]+)-(\d+)", topology.name)
  return ALIASES.get(match.group(1), match.group(1)) if match else None


def is_tpu_topology(topology: Topology) -> bool:
  return _family(topology) in _TPU_FAMILIES


def topology_devices(topology: Topology) -> list:
  """Compile-only TPU devices of the slice (needs libtpu; starts no TPU)."""
  import jax
  from jax.experimental import topologies

  try:
    devices = list(topologies.get_topology_desc(tpu_topology_name(topology), "tpu").devices)
  except jax.errors.JaxRuntimeError as e:
    if "lockfile" not in str(e):
      raise
    # libtpu lets one process at a time load it (its lock is /tmp/libtpu_lockfile)
    raise PlanError("libtpu is in use by another process on this machine (a training run or "
                    "another plan?); plan again once it is free, or, where no process here "
                    "uses a TPU, with ALLOW_MULTIPLE_LIBTPU_LOAD=1") from None
  if len(devices) != topology.devices:
    raise PlanError(f"libtpu describes {tpu_topology_name(topology)} with {len(devices)} "
                    f"devices, expected {topology.devices}")
  return devices


# ------------------------------------------------------------------------------------------
# Compiled figures


@dataclasses.dataclass(frozen=True)
class Memory:
  """Per-device bytes from `compiled.memory_analysis()`."""
  arguments: int
  outputs: int
  aliased: int      # outputs that reuse donated argument buffers (the train state)
  temps: int
  code: int

  @property
  def total(self) -> int:
    """What lives on the device at the peak: inputs, outputs not aliased, temps, code."""
    return self.arguments + self.outputs - self.aliased + self.temps + self.code

  @classmethod
  def of(cls, compiled) -> "Memory":
    m = compiled.memory_analysis()
    return cls(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
               aliased=m.alias_size_in_bytes, temps=m.temp_size_in_bytes,
               code=m.generated_code_size_in_bytes)


@dataclasses.dataclass
class CompiledStep:
  name: str                     # train | eval | index
  seconds: float                # lower + compile wall time
  mesh: dict[str, int]
  memory: Memory | None = None
  flops: float | None = None    # per device, every layer counted
  flops_scan_body_once: float | None = None  # cost_analysis() as reported
  compiled: object = None       # jax.stages.Compiled (None when it did not compile)
  error: str | None = None      # e.g. XLA's "ran out of memory in memory space hbm"
  hbm_used: int | None = None   # from an out-of-memory error: what the program needed
  cpu_seconds: float = 0.0      # process CPU time of lower + compile (all threads)


def _cost_flops(stage) -> float:
  cost = stage.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0]
  return float(cost.get("flops", 0.0)) if cost else 0.0


# XLA:TPU's two ways of saying a program does not fit (the first is libtpu 0.0.42's):
#   "the total memory required for HLO temporaries (106.29G) exceeds available HBM (95.74G)"
#   "Used 19.51G of 15.75G hbm. Exceeded hbm capacity by 3.76G."
_OOM = (re.compile(r"\(([\d.]+)([KMGT])\) exceeds available HBM"),
        re.compile(r"Used ([\d.]+)([KMGT]) of [\d.]+[KMGT] hbm"))


def _oom_bytes(message: str) -> int | None:
  """What an out-of-memory compile error says the program needs (at least), in bytes."""
  scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
  for pattern in _OOM:
    match = pattern.search(message)
    if match:
      return int(float(match.group(1)) * scale[match.group(2)])
  return None


def _compile(name: str, mesh_shape: dict[str, int], lower: Callable[[], object],
             extra_flops: float) -> CompiledStep:
  start, cpu_start = time.perf_counter(), time.process_time()
  result = CompiledStep(name=name, seconds=0.0, mesh=mesh_shape)
  try:
    compiled = lower().compile()
  except Exception as e:  # XLA reports "does not fit" (and nothing else useful) by raising
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text and "memory space hbm" not in text:
      raise
    result.error = next((line.strip() for line in text.splitlines()
                         if "hbm" in line.lower()), text.splitlines()[0])
    result.hbm_used = _oom_bytes(text)
  else:
    result.compiled = compiled
    result.memory = Memory.of(compiled)
    result.flops_scan_body_once = _cost_flops(compiled)
    result.flops = result.flops_scan_body_once + extra_flops
  result.seconds = time.perf_counter() - start
  result.cpu_seconds = time.process_time() - cpu_start
  return result


def _abstract(tree, shardings):
  import jax
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def abstract_batch(cfg, batch_size: int, batch_sharding) -> dict:
  """ShapeDtypeStructs of one global batch (the keys and dtypes of data.pipeline)."""
  import jax
  import jax.numpy as jnp

  from prism_jax.step import BATCH_KEYS

  shape = (batch_size, cfg.data.seq_len)
  return {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "loss_mask" else jnp.int32,
                                  sharding=batch_sharding) for k in BATCH_KEYS}


def layer_flops(cfg, batch_size: int, devices: int, *, train: bool) -> float:
  """Per-device FLOPs of one decoder layer (forward, or forward+backward under the config's
  remat policy), from the cost analysis of that layer lowered on its own (nothing compiled)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from prism_jax.models import backbone

  m = cfg.model
  graph, state = nnx.split(nnx.eval_shape(lambda: backbone.Block(m, nnx.Rngs(0))))
  shape = (batch_size, cfg.data.seq_len)
  x = jax.ShapeDtypeStruct(shape + (m.d_model,), jnp.dtype(m.compute_dtype))
  positions = jax.ShapeDtypeStruct(shape, jnp.int32)
  mask = jax.ShapeDtypeStruct((batch_size, 1) + shape[1:] * 2, jnp.bool_)

  def apply(state, x, positions, mask):
    return nnx.merge(graph, state)(x, positions, mask)

  if m.remat != "none":
    apply = jax.checkpoint(apply, policy=backbone._REMAT_POLICIES[m.remat])
  if train:
    def fn(state, x, positions, mask):
      loss = lambda s, x: jnp.sum(apply(s, x, positions, mask).astype(jnp.float32))
      # value_and_grad: the forward stays (the step needs it), and remat recomputes it.
      return jax.value_and_grad(loss, argnums=(0, 1))(state, x)
  else:
    fn = apply
  return _cost_flops(jax.jit(fn).lower(state, x, positions, mask)) / devices


def compile_for_topology(cfg, topology: Topology, steps=STEPS, attr=None,
                         log: Callable[[str], None] | None = None) -> list[CompiledStep]:
  """Lowers and compiles `steps` of `cfg` for the TPU slice `topology`; returns the figures."""
  import jax
  from jax.sharding import NamedSharding

  from prism_jax import sharding
  from prism_jax.optim import make_optimizer
  from prism_jax.step import BATCH_KEYS, make_eval_step, make_train_step, state_shardings

  devices = topology_devices(topology)
  mesh_shape = resolve_mesh(cfg.mesh, topology.devices)
  mesh = sharding.make_mesh(cfg.mesh, devices)
  rules = cfg.mesh.rules
  tx = make_optimizer(cfg.optimizer, cfg.train.steps)
  graphdef, abstract, state_sh = state_shardings(cfg, mesh, tx)
  batch_sh = NamedSharding(mesh, sharding.logical_to_spec(("batch", "length"), dict(rules)))
  batch = abstract_batch(cfg, cfg.data.batch_size, batch_sh)
  state = _abstract(abstract, state_sh)
  per_layer = lambda b, d, train: (layer_flops(cfg, b, d, train=train) * (cfg.model.num_layers - 1)
                                   if cfg.model.scan_layers else 0.0)
  out = []

  def say(text):
    if log:
      log(text)

  if "train" in steps:
    say(f"compiling train step for {topology.name} ...")
    # As step.compile_steps jits it (in/out shardings, donated state), under the run's mesh.
    def lower_train():
      fn = jax.jit(make_train_step(graphdef, cfg, tx),
                   in_shardings=(state_sh, {k: batch_sh for k in BATCH_KEYS}),
                   out_shardings=(state_sh, None), donate_argnums=(0,))
      with jax.set_mesh(mesh), sharding.use_rules(rules):
        return fn.lower(state, batch)
    out.append(_compile("train", mesh_shape, lower_train,
                        per_layer(cfg.data.batch_size, topology.devices, True)))

  if "eval" in steps:
    say(f"compiling eval step for {topology.name} ...")
    def lower_eval():
      fn = jax.jit(make_eval_step(graphdef, cfg),
                   in_shardings=(state_sh.params, {k: batch_sh for k in BATCH_KEYS}))
      with jax.set_mesh(mesh), sharding.use_rules(rules):
        return fn.lower(state.params, batch)
    out.append(_compile("eval", mesh_shape, lower_eval,
                        per_layer(cfg.data.batch_size, topology.devices, False)))

  if "index" in steps and cfg.model.head == "prism":
    from prism_jax.attribution import index_step
    from prism_jax.attribution.config import AttributionConfig

    say(f"compiling index step for {topology.name} ...")
    # The index pass as `index` runs it: the run's mesh and rules, parameters laid out like
    # training, the curvature sums on the bank's axis. Planned with the values term's
    # curvature by default (the costlier pass; the default method's needs none). Exact
    # D x D blocks per prototype do not fit at pod scale ([M, D, D]); the shared basis keeps
    # one D-vector per prototype.
    attr = attr or AttributionConfig(curvature="shared")
    shared = attr.curvature == "shared"
    m, v, d = cfg.prototypes.num_prototypes, cfg.model.vocab_size, cfg.model.d_model
    shapes = index_step.sum_shapes(attr.curvature, m, v, d)
    with sharding.use_rules(rules):
      sums = {k: jax.ShapeDtypeStruct(shape, jax.numpy.float32, sharding=NamedSharding(
          mesh, sharding.logical_to_spec(index_step.AXES[k]))) for k, shape in shapes.items()}
    basis = jax.ShapeDtypeStruct((d, d), jax.numpy.float32) if shared else None

    def lower_index():
      fn = jax.jit(index_step.step(graphdef, attr.softmax_top, attr.index_influence),
                   donate_argnums=(2,))
      with jax.set_mesh(mesh), sharding.use_rules(rules):
        return fn.lower(state.params, batch, sums, basis)
    out.append(_compile("index", mesh_shape, lower_index,
                        per_layer(cfg.data.batch_size, topology.devices, False)))
  return out


# ------------------------------------------------------------------------------------------
# Output


def _gib(n: int | None) -> str:
  return "-" if n is None else f"{n / GIB:.2f} GiB"


def report(results: list[CompiledStep], topology: Topology, estimate: int | None) -> str:
  """Lines for `plan`: compiled per-device memory and FLOPs per step, and a verdict."""
  hbm = None if topology.hbm_gib is None else int(topology.hbm_gib * GIB)
  lines = [f"compiled for {tpu_topology_name(topology)} (XLA:TPU, libtpu; per device):"]
  for r in results:
    mesh = " ".join(f"{k}={v}" for k, v in r.mesh.items())
    if r.memory is None:
      lines.append(f"  {r.name:<6} does not compile: {r.error} ({r.seconds:.0f} s)")
      continue
    m = r.memory
    scanned = " + the scanned layer body x (N-1)" if r.flops != r.flops_scan_body_once else ""
    lines.append(f"  {r.name:<6} {_gib(m.total):>10} = arguments {_gib(m.arguments)} + outputs "
                 f"{_gib(m.outputs)} - aliased {_gib(m.aliased)} + temps {_gib(m.temps)} + "
                 f"code {_gib(m.code)}")
    lines.append(f"  {'':<6} {r.flops / 1e12:.2f} TFLOP per step (cost analysis{scanned}); "
                 f"mesh {mesh}; lowered and compiled in {r.seconds:.0f} s "
                 f"({r.cpu_seconds:.0f} s CPU)")
  train = next((r for r in results if r.name == "train"), None)
  if train is not None and estimate is not None and train.memory is not None:
    lines.append(f"  train: compiled {_gib(train.memory.total)} vs estimate {_gib(estimate)} "
                 f"({train.memory.total / estimate:.2f}x)")
  if hbm is not None:
    worst = max(results, key=lambda r: r.memory.total if r.memory else (r.hbm_used or 2**62))
    need = worst.memory.total if worst.memory else worst.hbm_used
    if fits(results, topology):
      lines.append(f"verdict      fits (compiled): the largest step ({worst.name}) needs "
                   f"{_gib(need)} of {topology.hbm_gib:g} GiB HBM per device, {need / hbm:.0%}")
    else:
      need_text = (_gib(need) if worst.memory else
                   f"at least {_gib(need)}" if need else "more than the")
      lines.append(f"verdict      does not fit (compiled): the {worst.name} step needs "
                   f"{need_text} of {topology.hbm_gib:g} GiB HBM")
  return "\n".join(lines)


def fits(results: list[CompiledStep], topology: Topology) -> bool:
  hbm = int(topology.hbm_gib * GIB)
  return all(r.memory is not None and r.memory.total <= hbm for r in results)
