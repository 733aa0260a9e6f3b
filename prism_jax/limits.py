"""The range of every number a user can set: config keys, `attr.*` keys and CLI flags.

One table, read by the config validation, by every parser (`cli.number_flag`) and by the
bad-input test, so a new numeric setting without a row here fails the tests, not a user.

  CONFIG_RANGES["model.num_heads"].check("model.num_heads", 0)  # ConfigError, one line
"""

from __future__ import annotations

import dataclasses
import math

from prism_jax.errors import ConfigError

SEED_MAX = 2**32 - 1  # numpy/jax seeds are 32-bit
BIG = 10**9           # "any sensible count": far above real use, far below int64 trouble


@dataclasses.dataclass(frozen=True)
class Range:
  """`kind` values in [low, high] (ends excluded where `*_open`); floats must be finite."""
  kind: type = int
  low: float | None = None
  high: float | None = None
  low_open: bool = False
  high_open: bool = False
  also: tuple = ()  # values allowed outside [low, high] (e.g. -1: "the remaining devices")

  def describe(self) -> str:
    left = "(" if self.low_open else "["
    right = ")" if self.high_open else "]"
    low = "-inf" if self.low is None else _fmt(self.low)
    high = "inf" if self.high is None else _fmt(self.high)
    extra = "".join(f" or {_fmt(v)}" for v in self.also)
    return f"in {left}{low}, {high}{right}{extra}"

  def contains(self, value) -> bool:
    if value in self.also:
      return True
    if isinstance(value, float) and not math.isfinite(value):
      return False
    if self.low is not None and (value <= self.low if self.low_open else value < self.low):
      return False
    if self.high is not None and (value >= self.high if self.high_open else value > self.high):
      return False
    return True

  def check(self, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"{name}={value!r} is not a number")
    if not self.contains(value):
      raise ConfigError(f"{name}={_fmt(value)} must be {self.describe()}")

  def outside(self) -> list:
    """Values this range refuses, for the bad-input test."""
    bad = []
    if self.low is not None:
      bad.append(self.low if self.low_open else self.low - 1)
    if self.high is not None:
      bad.append(self.high if self.high_open else self.high + 1)
    if self.kind is float:
      bad.append(float("nan"))
    bad = [self.kind(v) if self.kind is int else float(v) for v in bad]
    return [v for v in bad if v not in self.also]


def _fmt(v) -> str:
  if isinstance(v, float) and math.isfinite(v) and v.is_integer():
    return str(int(v))
  return str(v)


def count(low=1, high=BIG) -> Range:
  return Range(int, low, high)


def seed() -> Range:
  return Range(int, 0, SEED_MAX)


def weight(high=1e6) -> Range:
  return Range(float, 0.0, high)


def fraction_open() -> Range:
  return Range(float, 0.0, 1.0, low_open=True, high_open=True)


def positive(high=1e6) -> Range:
  return Range(float, 0.0, high, low_open=True)


MESH_AXIS = Range(int, 1, 65536, also=(-1,))

# Every int/float field of ExperimentConfig and AttributionConfig (test_config checks that
# none is missing).
CONFIG_RANGES: dict[str, Range] = {
    "model.vocab_size": count(2, 2**22),
    "model.d_model": count(2, 2**16),
    "model.num_layers": count(1, 1024),
    "model.num_heads": count(1, 1024),
    "model.d_ff": count(1, 2**20),
    "model.max_seq_len": count(1, 2**20),
    "model.rope_theta": positive(1e9),
    "model.norm_eps": Range(float, 0.0, 1.0, low_open=True, high_open=True),
    "model.init_std": positive(10.0),
    "prototypes.num_prototypes": count(1, 2**22),
    "prototypes.top_k": count(1, 1024),
    "prototypes.init_temperature": positive(100.0),
    "prototypes.min_temperature": positive(100.0),
    "prototypes.max_temperature": positive(100.0),
    "prototypes.key_init_std": positive(100.0),
    "prototypes.selection_bias_rate": weight(1.0),
    "prototypes.whiten_rate": weight(1.0),
    "prototypes.whiten_shrinkage": weight(1e6),
    "prototypes.straight_through": weight(10.0),
    "prototypes.revive_after": count(0),
    "prototypes.score_blocks": count(1, 4096),
    "losses.cluster": weight(),
    "losses.evidence": weight(),
    "losses.diversity": weight(),
    "losses.diversity_margin": Range(float, -1.0, 1.0),
    "losses.diversity_sample": count(0, 2**22),
    "losses.balance": weight(),
    "losses.z_loss": weight(),
    "data.validation_fraction": fraction_open(),
    "data.seq_len": count(1, 2**20),
    "data.batch_size": count(1, 2**24),
    "data.shuffle_seed": seed(),
    "data.prefetch": count(0, 1024),
    "optimizer.learning_rate": positive(10.0),
    "optimizer.warmup_steps": count(0),
    "optimizer.decay_steps": count(0),
    "optimizer.min_lr_ratio": Range(float, 0.0, 1.0),
    "optimizer.b1": Range(float, 0.0, 1.0, high_open=True),
    "optimizer.b2": Range(float, 0.0, 1.0, high_open=True),
    "optimizer.eps": Range(float, 0.0, 1.0, low_open=True),
    "optimizer.weight_decay": weight(10.0),
    "optimizer.grad_clip_norm": positive(1e9),
    "optimizer.key_lr_scale": weight(1e4),
    "train.steps": count(1),
    "train.seed": seed(),
    "train.log_every": count(1),
    "train.eval_every": count(1),
    "train.eval_batches": count(1),
    "train.max_nonfinite_steps": count(1),
    "train.profile_start": count(0),
    "train.profile_steps": count(0),
    "mesh.data": MESH_AXIS,
    "mesh.fsdp": MESH_AXIS,
    "mesh.model": MESH_AXIS,
    "distributed.num_processes": count(0, 65536),
    "distributed.process_id": Range(int, 0, 65535, also=(-1,)),
    "distributed.initialization_timeout_s": count(1, 86400),
    "checkpoint.every": count(1),
    "checkpoint.keep": count(1, 10**6),
    # attribution (AttributionConfig, set as attr.key=value)
    "attr.top_examples": count(1, 10**6),
    "attr.span_tokens": count(0, 4096),
    "attr.batch_size": count(1, 2**16),
    "attr.index_examples": count(0),
    "attr.index_seed": seed(),
    "attr.neighbourhood_size": count(1, 10**6),
    "attr.shard_prototypes": count(1, 2**22),
    "attr.postings": count(0, 10**9),
    "attr.softmax_top": count(1, 2**20),
    "attr.target_postings": count(1, 10**9),
    "attr.unembedding_damping": positive(1e6),
    "attr.context_sharpness": weight(64.0),
    "attr.context_match": weight(1e6),
    "attr.index_part_batches": count(1, 10**6),
    "attr.damping": weight(),
    "attr.trak_projection_dim": count(1, 2**16),
    "attr.trak_damping": weight(),
    "attr.trak_seed": seed(),
    "attr.trak_ensemble": count(1, 64),
    "attr.ekfac_damping": weight(),
    "attr.ekfac_label_seed": seed(),
    "attr.ekfac_fit_examples": count(0),
    "attr.lds_examples": count(2, 10**7),
    "attr.lds_subsets": count(2, 10**5),
    "attr.lds_seeds": count(1, 1000),
    "attr.lds_fraction": fraction_open(),
    "attr.lds_queries": count(1, 10**6),
    "attr.lds_tuning_queries": count(1, 10**6),
    "attr.lds_copied_queries": count(0, 10**6),
    "attr.lds_copied_tuning": count(0, 10**6),
    "attr.lds_group": count(1, 4096),
    "attr.lds_bootstrap": count(1, 10**6),
}

# Every numeric command-line flag, one meaning per name, with the entry points that take it
# (the bad-input test runs each pair). Parsers get them through `cli.number_flag`.
FLAG_RANGES: dict[str, tuple[Range, tuple[str, ...]]] = {
    "--step": (count(0), ("evaluate", "generate", "index", "attribute", "control calibrate",
                          "control suppress", "explore")),
    "--limit": (count(0), ("evaluate", "control calibrate", "compare")),
    "--val-batches": (count(1), ("evaluate", "control suppress", "explore", "compare")),
    "--batch-size": (count(1, 2**16), ("evaluate", "control calibrate")),
    "--max-new-tokens": (count(1, 2**16), ("generate", "explore")),
    "--temperature": (Range(float, 0.0, 100.0), ("generate", "control suppress")),
    "--top-k": (count(0, 2**22), ("generate",)),
    "--top-p": (Range(float, 0.0, 1.0, low_open=True), ("generate",)),
    "--seed": (seed(), ("generate",)),
    "--show": (count(0, 10**4), ("generate", "control calibrate")),
    "--calibration-fraction": (fraction_open(), ("control calibrate",)),
    "--split-seed": (seed(), ("control calibrate",)),
    "--steps": (count(1, 10**7), ("control calibrate",)),
    "--learning-rate": (positive(100.0), ("control calibrate",)),
    "--l1": (weight(), ("control calibrate",)),
    "--prototypes": (count(0, 2**22), ("control suppress",)),
    "--min-share": (Range(float, 0.0, 1.0, low_open=True), ("control suppress",)),
    "--neighbours": (count(1, 10**6), ("control suppress",)),
    "--max-prototypes": (count(1, 2**22), ("control suppress",)),
    "--samples": (count(1, 10**5), ("control suppress",)),
    "--gen-tokens": (count(1, 2**16), ("control suppress",)),
    "--vocab-size": (count(2, 2**22), ("data",)),
    "--bench-batches": (count(0, 10**6), ("data",)),
    "--devices": (count(1, 2**17), ("plan",)),
    "--hbm-gib": (positive(1e4), ("plan",)),
}
