"""Mesh and memory planning for an experiment on a topology, without any accelerator.

  python -m prism_jax.main.plan --exp prism_1b --topology v5p-64   (the command)

Prints the parameter count (jax.eval_shape: nothing is allocated), the mesh (MeshConfig's -1
resolved against the device count), per-device bytes of parameters, optimizer state and
gradients read from the NamedShardings that `step.state_shardings` builds on an AbstractMesh
(so 256 devices plan fine on a 1-device CPU), an activation estimate for the remat policy,
tokens per step and a verdict. A layout that cannot work (the batch or a sharded dimension
not divisible by its mesh axes, or more bytes than HBM) exits 2 with one line naming why.
The formulas are written out in docs/scaling.md.

On a TPU slice (v5p-128, v5e-256, ...) the plan is then proven by compilation when `libtpu`
is installed (`pip install -e '.[tpu-plan]'`): `prism_jax.aot` lowers and compiles the real
train, eval and index steps for that topology on this CPU and prints each one's compiled
per-device memory and FLOPs next to the estimate; the fits / does-not-fit verdict is then the
compiled figure's. Without libtpu the estimate stands and one line says how to install it.
An experiment may name the topology it is planned for (`experiments.planned_topology`), so
`--topology` can be left out.

The topology table below has no jax import so that `launch/` can validate accelerator types
cheaply; jax is imported inside the functions that need it.
"""

from __future__ import annotations

import dataclasses
import math
import re

from prism_jax import limits
from prism_jax.errors import UserError

GIB = 2**30
MESH_AXES = ("data", "fsdp", "model")  # == sharding.MESH_AXES (that module imports jax)
# XLA needs scratch space, and allocations fragment: plan against 90% of HBM.
USABLE_FRACTION = 0.9
# Without --topology and without a topology named by the experiment: a host of 8 devices.
DEFAULT_DEVICES = 8


class PlanError(UserError):
  """The experiment cannot be laid out on the topology."""


# ------------------------------------------------------------------------------------------
# Topologies


@dataclasses.dataclass(frozen=True)
class Generation:
  """An accelerator family: how its name's suffix counts, its HBM per device."""
  hbm_gib: float
  suffix_per_device: int  # v4/v5p names count TensorCores, 2 per chip (one JAX device)
  sizes: tuple[int, ...]  # accepted suffixes
  platform: str  # "tpu" | "gpu"


_POW2_1_256 = (1, 4, 8, 16, 32, 64, 128, 256)
# Accepted suffixes: the documented slice sizes (v4/v5p: every multiple of 8 up to the largest
# pod; gcloud itself rejects the few odd shapes in between).
GENERATIONS: dict[str, Generation] = {
    "v4": Generation(32, 2, tuple(range(8, 4096 + 1, 8)), "tpu"),
    "v5p": Generation(95, 2, tuple(range(8, 12288 + 1, 8)), "tpu"),
    "v5litepod": Generation(16, 1, _POW2_1_256, "tpu"),  # v5e; gcloud's name
    "v6e": Generation(32, 1, _POW2_1_256, "tpu"),
    "h100": Generation(80, 1, tuple(range(1, 4097)), "gpu"),
    "a100": Generation(80, 1, tuple(range(1, 4097)), "gpu"),
}
ALIASES = {"v5e": "v5litepod"}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str            # as typed, e.g. "v5p-64", or "256 devices"
  devices: int         # JAX devices: TPU chips or GPUs
  hbm_gib: float | None  # per device; None when unknown (--devices without --hbm-gib)


def parse_topology(text: str) -> Topology:
  """`v5p-64` (32 chips), `v5litepod-16`, `v6e-8`, `h100-16`, or a bare device count."""
  text = text.strip()
  if text.isdigit():
    valid, _ = limits.FLAG_RANGES["--devices"]  # a bound, so no count makes the planner crawl
    if not valid.contains(int(text)):
      raise PlanError(f"--topology {text}: a device count must be {valid.describe()}")
    return Topology(f"{int(text)} devices", int(text), None)
  match = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
  family = ALIASES.get(match.group(1), match.group(1)) if match else None
  if family not in GENERATIONS:
    raise PlanError(f"unknown topology {text!r}; use a device count or one of "
                    f"{', '.join(g + '-N' for g in [*GENERATIONS, *ALIASES])}")
  gen, size = GENERATIONS[family], int(match.group(2))
  if size not in gen.sizes:
    raise PlanError(f"{text!r} is not a {family} slice size (use "
                    f"{_describe_sizes(gen.sizes)})")
  return Topology(text, size // gen.suffix_per_device, gen.hbm_gib)


def tpu_accelerator_types() -> list[str]:
  """Families gcloud accepts as --accelerator-type (e.g. v5p-64); see `is_tpu_accelerator`."""
  return [f for f, g in GENERATIONS.items() if g.platform == "tpu"]


def is_tpu_accelerator(text: str) -> bool:
  match = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
  gen = GENERATIONS.get(match.group(1)) if match else None
  return bool(gen and gen.platform == "tpu" and int(match.group(2)) in gen.sizes)


def _describe_sizes(sizes: tuple[int, ...]) -> str:
  if len(sizes) > 12:
    step = sizes[1] - sizes[0]
    return f"multiples of {step} from {sizes[0]} to {sizes[-1]}"
  return ", ".join(map(str, sizes))


# ------------------------------------------------------------------------------------------
# Mesh resolution and divisibility (pure arithmetic on shapes and PartitionSpecs)


def resolve_mesh(mesh_cfg, devices: int) -> dict[str, int]:
  """MeshConfig's (data, fsdp, model) with its -1 resolved; same rules as sharding.make_mesh."""
  shape = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.model]
  if shape.count(-1) > 1:
    raise PlanError("at most one of mesh.data, mesh.fsdp, mesh.model may be -1")
  if any(s == 0 or s < -1 for s in shape):
    raise PlanError(f"mesh sizes must be positive or -1, got {dict(zip(MESH_AXES, shape))}")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if devices % known:
      raise PlanError(f"{devices} devices cannot be split into mesh "
                      f"{mesh_text(dict(zip(MESH_AXES, shape)))}: {known} does not divide "
                      f"{devices}")
    shape[shape.index(-1)] = devices // known
  if math.prod(shape) != devices:
    raise PlanError(f"mesh {mesh_text(dict(zip(MESH_AXES, shape)))} needs "
                    f"{math.prod(shape)} devices, the topology has {devices}")
  return dict(zip(MESH_AXES, shape))


def mesh_text(mesh: dict[str, int]) -> str:
  return " ".join(f"{k}={v}" for k, v in mesh.items())


def _axes(entry) -> tuple[str, ...]:
  """Mesh axes of one PartitionSpec entry (None, "fsdp" or ("data", "fsdp"))."""
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def shard_shape(shape: tuple[int, ...], spec, mesh: dict[str, int]) -> tuple[int, ...]:
  """Per-device shape of an array of `shape` laid out by `spec` (dimensions must divide)."""
  entries = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
  return tuple(d // math.prod(mesh[a] for a in _axes(e)) for d, e in zip(shape, entries))


# Which config key sets each logical axis, so an error says what to change.
_AXIS_KEYS = {
    "heads": "model.num_heads", "embed": "model.d_model", "mlp": "model.d_ff",
    "vocab": "model.vocab_size", "prototypes": "prototypes.num_prototypes",
    "head_dim": "model.d_model/model.num_heads", "layers": "model.num_layers",
    "batch": "data.batch_size", "norm": "model.d_model",
}


@dataclasses.dataclass(frozen=True)
class Leaf:
  """One parameter: its path, global shape, dtype size, logical axes, PartitionSpec."""
  path: str
  shape: tuple[int, ...]
  itemsize: int
  logical: tuple[str | None, ...]
  spec: object  # jax.sharding.PartitionSpec


def divisibility_problems(leaves: list[Leaf], batch: int, batch_spec,
                          mesh: dict[str, int]) -> list[str]:
  """Every sharded dimension (and the batch) that its mesh axes do not divide."""
  problems = []
  shards = math.prod(mesh[a] for a in _axes(tuple(batch_spec)[0]))
  if batch % shards:
    problems.append(f"data.batch_size={batch} is not divisible by the {shards} batch shards "
                    f"({' x '.join(f'{a}={mesh[a]}' for a in _axes(tuple(batch_spec)[0]))})")
  seen = set()
  for leaf in leaves:
    for dim, (size, entry, name) in enumerate(zip(leaf.shape, tuple(leaf.spec), leaf.logical)):
      axes = _axes(entry)
      ways = math.prod(mesh[a] for a in axes)
      if size % ways == 0 or (name, axes) in seen:
        continue
      seen.add((name, axes))
      key = _AXIS_KEYS.get(name, f"dimension {dim}")
      problems.append(f"{key}={size} (dimension {name!r} of {leaf.path}) is not divisible by "
                      f"mesh {' x '.join(f'{a}={mesh[a]}' for a in axes)}")
  return problems


def suggest_mesh(leaves: list[Leaf], batch: int, batch_spec, devices: int,
                 preferred: dict[str, int]) -> dict[str, int] | None:
  """A (data, fsdp, model) on the same devices that divides everything, or None.

  Prefers the configured model axis, then the most FSDP (least data parallelism).
  """
  options = []
  for model in _divisors(devices):
    for data in _divisors(devices // model):
      mesh = {"data": data, "fsdp": devices // model // data, "model": model}
      if not divisibility_problems(leaves, batch, batch_spec, mesh):
        options.append((model != preferred["model"], model, data, mesh))
  return min(options, key=lambda o: o[:3])[3] if options else None


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


# ------------------------------------------------------------------------------------------
# The plan


@dataclasses.dataclass
class Plan:
  exp: str
  topology: Topology
  num_params: int
  param_bytes_total: int
  mesh: dict[str, int]
  tokens_per_step: int
  batch_per_device: int
  leaves: list[Leaf]
  problems: list[str]
  suggestion: dict[str, int] | None
  remat: str
  # Filled only when `problems` is empty (shard shapes need even division):
  params_per_device: int = 0
  optimizer_per_device: int = 0
  gradients_per_device: int = 0
  activations: list[tuple[str, int, str]] = dataclasses.field(default_factory=list)

  @property
  def activation_bytes(self) -> int:
    return sum(b for _, b, _ in self.activations)

  @property
  def total_per_device(self) -> int:
    return (self.params_per_device + self.optimizer_per_device + self.gradients_per_device
            + self.activation_bytes)

  @property
  def usable_bytes(self) -> int | None:
    hbm = self.topology.hbm_gib
    return None if hbm is None else int(hbm * GIB * USABLE_FRACTION)


def _path_text(path) -> str:
  return ".".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path)


def _leaves(abstract_state, rules) -> list[Leaf]:
  import jax
  from flax import nnx
  from jax.sharding import PartitionSpec as P

  from prism_jax import sharding

  logical = nnx.to_pure_dict(nnx.get_partition_spec(abstract_state))
  shapes = nnx.to_pure_dict(abstract_state)
  flat_logical = dict(jax.tree_util.tree_flatten_with_path(
      logical, is_leaf=lambda x: isinstance(x, P))[0])
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    names = tuple(flat_logical[path])
    names = names + (None,) * (len(leaf.shape) - len(names))
    out.append(Leaf(_path_text(path), tuple(leaf.shape), leaf.dtype.itemsize, names,
                    sharding.logical_to_spec(names, dict(rules))))
  return out


def _tree_bytes(abstract_tree, sharding_tree, mesh: dict[str, int]) -> int:
  import jax

  shapes = jax.tree.leaves(abstract_tree)
  specs = [s.spec for s in jax.tree.leaves(sharding_tree)]
  assert len(shapes) == len(specs), "state and shardings trees differ"
  return sum(math.prod(shard_shape(x.shape, spec, mesh)) * x.dtype.itemsize
             for x, spec in zip(shapes, specs))


def make_plan(cfg, topology: Topology) -> Plan:
  """Everything `main` prints, computed from abstract shapes and an AbstractMesh."""
  from flax import nnx
  from jax.sharding import AbstractMesh, AxisType

  from prism_jax import sharding
  from prism_jax.models import lm
  from prism_jax.optim import make_optimizer
  from prism_jax.step import state_shardings

  rules = dict(cfg.mesh.rules)
  mesh = resolve_mesh(cfg.mesh, topology.devices)
  _, abstract_params = lm.abstract_model(cfg)
  leaves = _leaves(abstract_params, cfg.mesh.rules)
  batch_spec = sharding.logical_to_spec(("batch", "length"), rules)
  batch = cfg.data.batch_size
  problems = divisibility_problems(leaves, batch, batch_spec, mesh)
  batch_shards = math.prod(mesh[a] for a in _axes(tuple(batch_spec)[0]))
  plan = Plan(exp=cfg.name, topology=topology,
              num_params=lm.count_params(nnx.to_pure_dict(abstract_params)),
              param_bytes_total=sum(math.prod(l.shape) * l.itemsize for l in leaves),
              mesh=mesh, tokens_per_step=batch * cfg.data.seq_len,
              batch_per_device=-(-batch // batch_shards), leaves=leaves, problems=problems,
              suggestion=None, remat=cfg.model.remat)
  if problems:
    plan.suggestion = suggest_mesh(leaves, batch, batch_spec, topology.devices, mesh)
    return plan

  abstract_mesh = AbstractMesh(tuple(mesh.values()), MESH_AXES,
                               axis_types=(AxisType.Auto,) * len(MESH_AXES))
  tx = make_optimizer(cfg.optimizer, cfg.train.steps)
  _, abstract, shardings = state_shardings(cfg, abstract_mesh, tx)
  plan.params_per_device = _tree_bytes(abstract.params, shardings.params, mesh)
  plan.optimizer_per_device = _tree_bytes(abstract.opt_state, shardings.opt_state, mesh)
  # Gradients have the parameters' shapes, dtypes and (after XLA's propagation) layout.
  plan.gradients_per_device = plan.params_per_device
  plan.activations = activation_estimate(cfg, mesh, leaves)
  return plan


def activation_estimate(cfg, mesh: dict[str, int], leaves: list[Leaf]):
  """[(component, bytes per device, formula)] for one training step; see docs/scaling.md.

  b = local batch, L = seq_len, D = d_model, F = d_ff, H = heads, K = D/H, V = vocab,
  M = prototypes, N = layers, c = compute bytes; '/x' is the per-device slice under the
  rules table (the same logical names the model constrains its activations with).
  """
  from prism_jax import sharding

  rules = dict(cfg.mesh.rules)
  m, p = cfg.model, cfg.prototypes
  c = 2 if m.compute_dtype == "bfloat16" else 4
  B, L, D, F, H, V, M, N = (cfg.data.batch_size, cfg.data.seq_len, m.d_model, m.d_ff,
                            m.num_heads, m.vocab_size, p.num_prototypes, m.num_layers)
  K = D // H

  def local(shape, names) -> int:
    return math.prod(shard_shape(shape, sharding.logical_to_spec(names, rules), mesh))

  resid = local((B, L, D), ("batch", "length", "embed"))          # b*L*D
  qkv = local((B, L, H, K), ("batch", "length", "heads", "head_dim"))  # b*L*D/model
  attn = local((B, H, L, L), ("batch", "heads", "length", None))  # b*H/model*L*L
  mlp = local((B, L, F), ("batch", "length", "mlp"))              # b*L*F/model
  scores = local((B, L, M), ("batch", "length", "prototypes"))    # b*L*M/model
  logits = local((B, L, V), ("batch", "length", "vocab"))         # b*L*V/model

  # Everything the backward pass of one block needs when nothing is recomputed.
  full_layer = c * (5 * resid + 6 * qkv + 4 * mlp) + (8 + c) * attn
  saved = {
      "none": (full_layer, "c*(5*bLD + 6*bLD/m + 4*bLF/m) + (8+c)*b*H/m*L^2"),
      "dots": (c * (3 * resid + 3 * qkv + 2 * mlp), "c*(3*bLD + 3*bLD/m + 2*bLF/m)"),
      "full": (c * resid, "c*bLD"),
  }[m.remat]
  out = [(f"layer stash (remat={m.remat})", N * saved[0], f"N x {saved[1]}")]
  if m.remat != "none":
    out.append(("one layer recomputed in backward", full_layer,
                "c*(5*bLD + 6*bLD/m + 4*bLF/m) + (8+c)*b*H/m*L^2"))
  out.append(("embeddings, final norm, residual grad", 3 * c * resid, "3*c*bLD"))
  if m.head == "prism":
    n = p.score_blocks  # the train step holds one block of L / n positions at a time
    out.append((f"prototype head [b,L/n,M/m] float32, n={n}",
                (5 * 4 * scores + scores) // n + 3 * 4 * resid,
                "(5*4*bLM/m (sim, dist, scores, act, balance softmax) + bLM/m mask) / n"
                " + 3*4*bLD"))
    if cfg.losses.diversity > 0:
      if cfg.losses.diversity_sample:  # the sampled keys' [s, s] cosines, replicated
        s = cfg.losses.diversity_sample
        out.append((f"diversity cos [{s}, {s}] float32", 2 * 4 * s * s, "2*4*s^2"))
      else:
        pairs = local((M, M), ("prototypes", None))
        out.append(("diversity cos [M, M/m] float32", 2 * 4 * pairs, "2*4*M*M/m"))
  else:
    out.append(("dense head hidden float32", 4 * resid, "4*bLD"))
  out.append(("logits [b,L,V/m] float32", 3 * 4 * logits, "3*4*bLV/m (logits, softmax, grad)"))
  out.append(_gathered_weights(cfg, mesh, leaves))
  return out


def _gathered_weights(cfg, mesh: dict[str, int], leaves: list[Leaf]):
  """FSDP all-gathers one layer's weights (and their gradients) at a time, plus the head's."""
  blocks, head = 0, 0
  for leaf in leaves:
    entries = tuple(leaf.spec) + (None,) * len(leaf.shape)
    gathered = math.prod(d // math.prod(mesh[a] for a in _axes(e) if a != "fsdp")
                         for d, e in zip(leaf.shape, entries))
    if ".blocks." in f".{leaf.path}.":
      blocks += gathered * leaf.itemsize
    elif len(leaf.shape) == 2:  # embedding/unembedding, prototype keys and values: float32
      head += gathered * 4
  return ("gathered weights (FSDP)", 2 * blocks // cfg.model.num_layers + head,
          "2 x one layer's weights/m + E, P, U /m in float32")


# ------------------------------------------------------------------------------------------
# Output


def format_bytes(n: int) -> str:
  for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= size:
      return f"{n / size:.2f} {unit}"
  return f"{n} B"


def describe_topology(topology: Topology) -> str:
  hbm = "HBM unknown" if topology.hbm_gib is None else f"{topology.hbm_gib:g} GiB HBM each"
  if topology.name.endswith(" devices"):
    return f"{topology.name}, {hbm}"
  return f"{topology.name} ({topology.devices} devices), {hbm}"


def report(plan: Plan, compiled_follows: bool = False) -> str:
  """The plan as text. With `compiled_follows` the estimate's verdict is labelled
  `estimate` (the compiled figures that follow decide)."""
  label = "estimate    " if compiled_follows else "verdict     "
  lines = [
      f"experiment   {plan.exp} on {describe_topology(plan.topology)}",
      f"parameters   {plan.num_params:,} ({format_bytes(plan.param_bytes_total)})",
      f"mesh         {mesh_text(plan.mesh)}",
      f"tokens/step  {plan.tokens_per_step:,} (global batch x seq_len); "
      f"{plan.batch_per_device} sequences per device",
  ]
  if plan.problems:
    return "\n".join(lines)
  lines += [
      "per device:",
      f"  parameters        {format_bytes(plan.params_per_device)}",
      f"  optimizer state   {format_bytes(plan.optimizer_per_device)}",
      f"  gradients         {format_bytes(plan.gradients_per_device)}",
      f"  activations       {format_bytes(plan.activation_bytes)} (estimate)",
  ]
  lines += [f"    {name:<40} {format_bytes(b):>11}  {formula}" for name, b, formula in plan.activations]
  lines.append(f"  total             {format_bytes(plan.total_per_device)}")
  usable = plan.usable_bytes
  if usable is None:
    lines.append("verdict      unknown: pass --hbm-gib X (HBM per device) for a verdict")
  elif plan.total_per_device <= usable or compiled_follows:
    fits = "fits" if plan.total_per_device <= usable else "does not fit"
    lines.append(f"{label} {fits}: {format_bytes(plan.total_per_device)} of {format_bytes(usable)} usable "
                 f"({USABLE_FRACTION:.0%} of {plan.topology.hbm_gib:g} GiB), "
                 f"{plan.total_per_device / usable:.0%}")
  return "\n".join(lines)


def check(plan: Plan) -> None:
  """Raises PlanError (one line) when the plan cannot run."""
  where = f"{plan.exp} on {plan.topology.name} (mesh {mesh_text(plan.mesh)})"
  if plan.problems:
    more = f" (and {len(plan.problems) - 1} more)" if len(plan.problems) > 1 else ""
    fix = (f"; try mesh.data={plan.suggestion['data']} mesh.fsdp={plan.suggestion['fsdp']} "
           f"mesh.model={plan.suggestion['model']}" if plan.suggestion
           else "; no mesh of this many devices divides every sharded dimension")
    raise PlanError(f"{where}: {plan.problems[0]}{more}{fix}")
  usable = plan.usable_bytes
  if usable is not None and plan.total_per_device > usable:
    remat = "" if plan.remat == "full" else ", model.remat=full"
    raise PlanError(f"{where} does not fit: needs {format_bytes(plan.total_per_device)} per device, "
                    f"{format_bytes(usable)} usable of {plan.topology.hbm_gib:g} GiB HBM; try more "
                    f"devices, a smaller data.batch_size{remat}")


def planned_topology(exp: str) -> str | None:
  """The topology an experiment names for itself (experiments' PLANNED_TOPOLOGIES), if any."""
  import experiments

  for module in vars(experiments).values():
    table = getattr(module, "PLANNED_TOPOLOGIES", None)
    if isinstance(table, dict) and exp in table:
      return table[exp]
  return None
