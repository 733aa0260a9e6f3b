"""PRISM head variants trained side by side with the dense twin at equal tokens.

  python -m benchmarks.ablate [--size tiny] [--steps 1000] [--seeds 0] [--variants A B ...]
                              [--jobs 2] [--no-train] [--out runs/ablate]
  make ablate ARGS='--steps 400 --variants defaults keys_trainable'

Each variant is a list of key=value overrides on the round-one head of prism_SIZE
(ROUND_ONE_HEAD: the head every PRISM experiment had before the fifth round's winner became
the default, so the rounds in docs/evaluate.md stay reproducible); `defaults` is prism_SIZE
as configured now, `round1` the round-one head itself, `dense` is dense_SIZE. Every
(variant, seed) trains in its own workdir, runs/ablate/SIZE_STEPS/VARIANT_sSEED, with the
same data, batch and step count as the dense twin (equal tokens). A finished run (its
metrics.jsonl holds val/loss at the last step) is reused, so a rerun only rescores and
redraws; `--no-train` never starts a run. Written next to the runs: ablation.md (the table)
and ablation.png (validation loss per variant and the training-loss curves).

Reported per variant: final validation loss (mean over seeds, and the spread), its gap to
the dense twin's mean at the same seeds, the step-time ratio (median logged tokens/s of
dense over that of the variant; runs share the machine, so this is indicative only -- use
`benchmarks.train_step` for the ratio to quote) and the head diagnostics at the last logged
step (prism_jax/diagnostics.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import experiments
from benchmarks import common
from prism_jax import outputs
from prism_jax.errors import UserError, exit_on_user_error

# The train command, in one place: `prism_jax.main.train` once the CLI move lands.
TRAIN_MODULE = "prism_jax.main.train"
LEGACY_TRAIN_MODULE = "prism_jax.train"

# The head the variants change (experiments.ROUND_ONE_HEAD) with its bank per size.
ROUND_ONE_HEAD = experiments.ROUND_ONE_HEAD
ROUND_ONE_BANK = {"tiny": ["prototypes.num_prototypes=256", "prototypes.top_k=8"],
                  "small": ["prototypes.num_prototypes=1024", "prototypes.top_k=16"]}
AS_CONFIGURED = ("dense", "defaults")  # run as the experiment is, without the round-one head

# Variants: name -> overrides of the round-one head. Keep names short; they label the table
# and plot.
VARIANTS: dict[str, list[str]] = {
    "dense": [],
    "defaults": [],
    "round1": [],
    # Trainable keys: the scale of the other matrices, and/or their own learning rate.
    "keys_0.02": ["prototypes.key_init_std=0.02"],
    "keys_lr10": ["optimizer.key_lr_scale=10"],
    "keys_unit": ["prototypes.key_init_std=0.0884", "prototypes.key_renorm=true"],
    # k-means style: the clustering pull moves keys to the data, never the data to keys.
    "sg_data": ["losses.stop_data_gradient=true"],
    "keys_0.02_sg": ["prototypes.key_init_std=0.02", "losses.stop_data_gradient=true"],
    "keys_unit_sg": ["prototypes.key_init_std=0.0884", "prototypes.key_renorm=true",
                     "losses.stop_data_gradient=true"],
    # A diversity term that acts: summed per prototype instead of averaged over M^2 pairs.
    "keys_unit_sg_div": ["prototypes.key_init_std=0.0884", "prototypes.key_renorm=true",
                         "losses.stop_data_gradient=true", "losses.diversity_reduce=per_prototype"],
    # Dead prototypes: selection-only bias balancing; revival of long-dead keys.
    "keys_unit_sg_bias": ["prototypes.key_init_std=0.0884", "prototypes.key_renorm=true",
                          "losses.stop_data_gradient=true", "prototypes.selection_bias_rate=0.01"],
    "keys_unit_sg_revive": ["prototypes.key_init_std=0.0884", "prototypes.key_renorm=true",
                            "losses.stop_data_gradient=true", "prototypes.revive_after=50"],
    # The same on the default (slowly turning) keys.
    "bias": ["prototypes.selection_bias_rate=0.01"],
    "bias_fast": ["prototypes.selection_bias_rate=0.05"],
    "bias_m1024k32": ["prototypes.selection_bias_rate=0.01", "prototypes.num_prototypes=1024",
                      "prototypes.top_k=32"],
    "bias_base": ["prototypes.selection_bias_rate=0.01", "prototypes.base_prototype=true"],
    "revive": ["prototypes.revive_after=25"],
    # Sharper weights: dot-product scores (gates scaled by the key norm), keys at 0.02.
    "dot": ["prototypes.similarity=dot", "prototypes.key_init_std=0.02"],
    "dot_bias": ["prototypes.similarity=dot", "prototypes.key_init_std=0.02",
                 "prototypes.selection_bias_rate=0.01"],
    # Sharper weights and a wider bank at once: M = 8 D, k = 32.
    "dot_bias_wide": ["prototypes.similarity=dot", "prototypes.key_init_std=0.02",
                      "prototypes.selection_bias_rate=0.01", "prototypes.num_prototypes=1024",
                      "prototypes.top_k=32"],
    "dot_bias_k64": ["prototypes.similarity=dot", "prototypes.key_init_std=0.02",
                     "prototypes.selection_bias_rate=0.01", "prototypes.num_prototypes=1024",
                     "prototypes.top_k=64"],
    # k = 32 at the default and a doubled bank: the active set widened where the scores
    # stay cheap ([B, L, M] grows with M, not k).
    "dot_bias_k32": ["prototypes.similarity=dot", "prototypes.key_init_std=0.02",
                     "prototypes.selection_bias_rate=0.01", "prototypes.top_k=32"],
    "dot_bias_m512k32": ["prototypes.similarity=dot", "prototypes.key_init_std=0.02",
                         "prototypes.selection_bias_rate=0.01", "prototypes.num_prototypes=512",
                         "prototypes.top_k=32"],
    # The wide bank with a base-rate slice, or with the k-means (data-side stopped) pull.
    "dot_bias_wide_base": ["prototypes.similarity=dot", "prototypes.key_init_std=0.02",
                           "prototypes.selection_bias_rate=0.01", "prototypes.num_prototypes=1024",
                           "prototypes.top_k=32", "prototypes.base_prototype=true"],
    "dot_bias_wide_sg": ["prototypes.similarity=dot", "prototypes.key_init_std=0.02",
                         "prototypes.selection_bias_rate=0.01", "prototypes.num_prototypes=1024",
                         "prototypes.top_k=32", "losses.stop_data_gradient=true"],
    # The wide bank made cheap: no balance loss (the selection bias balances; the loss's
    # softmax needs a dense [B, L, M] backward pass) and the diversity term on 256 sampled
    # keys per step; then with a diversity term that acts (per prototype).
    "wide_lean": ["prototypes.similarity=dot", "prototypes.key_init_std=0.02",
                  "prototypes.selection_bias_rate=0.01", "prototypes.num_prototypes=1024",
                  "prototypes.top_k=32", "losses.balance=0", "losses.diversity_sample=256"],
    "wide_lean_div": ["prototypes.similarity=dot", "prototypes.key_init_std=0.02",
                      "prototypes.selection_bias_rate=0.01", "prototypes.num_prototypes=1024",
                      "prototypes.top_k=32", "losses.balance=0", "losses.diversity_sample=256",
                      "losses.diversity_reduce=per_prototype"],
    "wide_lean_base": ["prototypes.similarity=dot", "prototypes.key_init_std=0.02",
                       "prototypes.selection_bias_rate=0.01", "prototypes.num_prototypes=1024",
                       "prototypes.top_k=32", "losses.balance=0", "losses.diversity_sample=256",
                       "prototypes.base_prototype=true"],
    # The lean wide bank with the k-means pull (the best of the wide variants at 1000 steps)
    # and a base slice; then with the diversity term that acts.
    "lean_sg": ["prototypes.similarity=dot", "prototypes.key_init_std=0.02",
                "prototypes.selection_bias_rate=0.01", "prototypes.num_prototypes=1024",
                "prototypes.top_k=32", "losses.balance=0", "losses.diversity_sample=256",
                "losses.stop_data_gradient=true"],
    "lean_sg_base": ["prototypes.similarity=dot", "prototypes.key_init_std=0.02",
                     "prototypes.selection_bias_rate=0.01", "prototypes.num_prototypes=1024",
                     "prototypes.top_k=32", "losses.balance=0", "losses.diversity_sample=256",
                     "losses.stop_data_gradient=true", "prototypes.base_prototype=true"],
    "lean_sg_base_div": ["prototypes.similarity=dot", "prototypes.key_init_std=0.02",
                         "prototypes.selection_bias_rate=0.01", "prototypes.num_prototypes=1024",
                         "prototypes.top_k=32", "losses.balance=0", "losses.diversity_sample=256",
                         "losses.stop_data_gradient=true", "prototypes.base_prototype=true",
                         "losses.diversity_reduce=per_prototype"],
    "wide_sg_sampled": ["prototypes.similarity=dot", "prototypes.key_init_std=0.02",
                        "prototypes.selection_bias_rate=0.01", "prototypes.num_prototypes=1024",
                        "prototypes.top_k=32", "losses.stop_data_gradient=true",
                        "losses.diversity_sample=256"],
    # The same with the clustering pull at a fifth of its weight: how much of the gap the
    # key-side pull costs cross-entropy through the selection.
    "wide_sg_sampled_light": ["prototypes.similarity=dot", "prototypes.key_init_std=0.02",
                              "prototypes.selection_bias_rate=0.01",
                              "prototypes.num_prototypes=1024", "prototypes.top_k=32",
                              "losses.stop_data_gradient=true", "losses.diversity_sample=256",
                              "losses.cluster=0.01", "losses.evidence=0.01"],
    # The best so far made wider: twice the active set, or twice the bank (M = 16 D).
    "wide_sg_sampled_k64": ["prototypes.similarity=dot", "prototypes.key_init_std=0.02",
                            "prototypes.selection_bias_rate=0.01",
                            "prototypes.num_prototypes=1024", "prototypes.top_k=64",
                            "losses.stop_data_gradient=true", "losses.diversity_sample=256"],
    "wide_sg_sampled_m2048": ["prototypes.similarity=dot", "prototypes.key_init_std=0.02",
                              "prototypes.selection_bias_rate=0.01",
                              "prototypes.num_prototypes=2048", "prototypes.top_k=32",
                              "losses.stop_data_gradient=true", "losses.diversity_sample=256"],
    # The best so far with the keys started from the values (an autoencoder's encoder
    # initialised from its decoder), or with the balance term moving the keys only.
    "wide_sg_sampled_tied": ["prototypes.similarity=dot", "prototypes.key_init_std=0.02",
                             "prototypes.selection_bias_rate=0.01",
                             "prototypes.num_prototypes=1024", "prototypes.top_k=32",
                             "losses.stop_data_gradient=true", "losses.diversity_sample=256",
                             "prototypes.tie_init=true"],
    "wide_sg_sampled_bko": ["prototypes.similarity=dot", "prototypes.key_init_std=0.02",
                            "prototypes.selection_bias_rate=0.01",
                            "prototypes.num_prototypes=1024", "prototypes.top_k=32",
                            "losses.stop_data_gradient=true", "losses.diversity_sample=256",
                            "losses.balance_keys_only=true"],
    # The key-side pull at four times its weight (a fifth was worse), and without the
    # selection bias (the pull and the balance term alone keep the bank in use).
    "wide_sg_sampled_heavy": ["prototypes.similarity=dot", "prototypes.key_init_std=0.02",
                              "prototypes.selection_bias_rate=0.01",
                              "prototypes.num_prototypes=1024", "prototypes.top_k=32",
                              "losses.stop_data_gradient=true", "losses.diversity_sample=256",
                              "losses.cluster=0.2", "losses.evidence=0.2"],
    "wide_sg_sampled_nobias": ["prototypes.similarity=dot", "prototypes.key_init_std=0.02",
                               "prototypes.num_prototypes=1024", "prototypes.top_k=32",
                               "losses.stop_data_gradient=true", "losses.diversity_sample=256"],
    # A tenth of the selection bias's rate: the bias trades cross-entropy for even use.
    "wide_sg_sampled_bias001": ["prototypes.similarity=dot", "prototypes.key_init_std=0.02",
                                "prototypes.selection_bias_rate=0.001",
                                "prototypes.num_prototypes=1024", "prototypes.top_k=32",
                                "losses.stop_data_gradient=true", "losses.diversity_sample=256"],
    # The balance term's pull on h matters (moving only the keys was far worse): five
    # times its weight.
    "wide_sg_sampled_bal05": ["prototypes.similarity=dot", "prototypes.key_init_std=0.02",
                              "prototypes.selection_bias_rate=0.01",
                              "prototypes.num_prototypes=1024", "prototypes.top_k=32",
                              "losses.stop_data_gradient=true", "losses.diversity_sample=256",
                              "losses.balance=0.05"],
    # Both findings of the fifth round at once: the heavier balance term and no selection bias.
    "wide_sg_sampled_bal05_nobias": ["prototypes.similarity=dot", "prototypes.key_init_std=0.02",
                                     "prototypes.num_prototypes=1024", "prototypes.top_k=32",
                                     "losses.stop_data_gradient=true",
                                     "losses.diversity_sample=256", "losses.balance=0.05"],
    # The sixth/seventh round: the defaults plus a straight-through gradient for h (the
    # top-k gives h gradient only along the k selected keys; this adds the dense head's).
    "defaults_st": ["prototypes.similarity=dot", "prototypes.key_init_std=0.02",
                    "prototypes.num_prototypes=1024", "prototypes.top_k=32",
                    "losses.stop_data_gradient=true", "losses.diversity_sample=256",
                    "losses.balance=0.05", "prototypes.straight_through=1.0"],
    "dot_sg_bias": ["prototypes.similarity=dot", "prototypes.key_init_std=0.02",
                    "losses.stop_data_gradient=true", "prototypes.selection_bias_rate=0.01"],
    # Sharper weights: a learned per-prototype threshold inside the relu.
    "keys_unit_sg_thr": ["prototypes.key_init_std=0.0884", "prototypes.key_renorm=true",
                         "losses.stop_data_gradient=true", "prototypes.thresholds=true"],
    # An always-on base-rate prototype (p0 carries the unigram prior).
    "keys_unit_sg_base": ["prototypes.key_init_std=0.0884", "prototypes.key_renorm=true",
                          "losses.stop_data_gradient=true", "prototypes.base_prototype=true"],
    # Bigger bank (M = 8 D) and k = 32.
    "keys_unit_sg_m1024k32": ["prototypes.key_init_std=0.0884", "prototypes.key_renorm=true",
                              "losses.stop_data_gradient=true", "prototypes.num_prototypes=1024",
                              "prototypes.top_k=32"],
    "m1024k32": ["prototypes.num_prototypes=1024", "prototypes.top_k=32"],
    # Everything above that keeps keys trainable and spread, at once.
    "all": ["prototypes.key_init_std=0.0884", "prototypes.key_renorm=true",
            "losses.stop_data_gradient=true", "losses.diversity_reduce=per_prototype",
            "prototypes.selection_bias_rate=0.01", "prototypes.thresholds=true",
            "prototypes.num_prototypes=1024", "prototypes.top_k=32"],
    "aux_off": ["losses.cluster=0", "losses.evidence=0", "losses.diversity=0",
                "losses.balance=0"],
}

DIAGNOSTICS = ("prototypes/key_drift_cos", "prototypes/best_match_cos",
               "prototypes/key_pair_cos", "prototypes/usage_perplexity",
               "prototypes/dead_in_batch", "prototypes/top1_share")
_SHORT = {"prototypes/key_drift_cos": "key drift cos",
          "prototypes/best_match_cos": "best-match cos",
          "prototypes/key_pair_cos": "key pair cos", "prototypes/usage_perplexity": "usage ppl",
          "prototypes/dead_in_batch": "dead", "prototypes/top1_share": "top-1 share"}


def variant_overrides(variant: str, size: str) -> list[str]:
  """The overrides that turn prism_SIZE (dense_SIZE for `dense`) into the variant."""
  if variant in AS_CONFIGURED:
    return []
  if size not in ROUND_ONE_BANK:
    raise SystemExit(f"error: --size {size}: the round-one bank is known for "
                     f"{', '.join(ROUND_ONE_BANK)} only")
  return [*ROUND_ONE_HEAD, *ROUND_ONE_BANK[size], *VARIANTS[variant]]


def train_command(exp: str, workdir: str, overrides: list[str]) -> list[str]:
  """The train CLI; falls back to the library call while the CLI is being moved."""
  args = ["--exp", exp, "--workdir", workdir, *overrides]
  for module in (TRAIN_MODULE, LEGACY_TRAIN_MODULE):
    if importlib.util.find_spec(module) is not None:
      return [sys.executable, "-m", module, *args]
  runner = ("import sys; from prism_jax.run import Run; from prism_jax.training import train\n"
            "r = Run.create(sys.argv[2], sys.argv[4], sys.argv[5:])\n"
            "with r: print(train(r.cfg, r.workdir, mesh=r.mesh).get('val/loss'))")
  return [sys.executable, "-c", runner, *args]


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  rows = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except ValueError:
        continue  # a torn last line
  return rows


def finished(workdir: str, steps: int) -> bool:
  return any(r.get("step") == steps and "val/loss" in r for r in read_metrics(workdir))


# What a finished run must share with the run the harness would train now to stand in for it
# in the table (where the data lives and how often it logs may differ).
_SETTINGS = ("model", "prototypes", "losses", "optimizer")
_TRAIN_SETTINGS = ("seed", "steps")


def other_settings(workdir: str, exp: str, overrides: list[str]) -> str | None:
  """How the run in `workdir` (its config.json) differs from `exp` with `overrides`, e.g.
  "losses.balance=0.05, not 0.1"; None when it does not, or when there is no run yet."""
  from prism_jax import cli, config as config_lib
  from prism_jax.checkpoint import settings_difference

  path = cli.config_path(workdir)
  if not path.exists():
    return None
  try:
    saved = cli.read_run_config(path)
  except UserError:
    return "a config.json that cannot be read as a run's config"
  want = config_lib.to_dict(config_lib.apply_overrides(experiments.get(exp), overrides))
  current = {section: want[section] for section in _SETTINGS}
  current["train"] = {k: want["train"][k] for k in _TRAIN_SETTINGS}
  current["data"] = {k: want["data"][k] for k in cli.DATA_STREAM}  # what resumes refuse
  saved = {section: saved.get(section) if isinstance(saved.get(section), dict) else {}
           for section in current}
  return settings_difference(json.loads(json.dumps(saved)), json.loads(json.dumps(current)))


def _lock_path(workdir: str) -> str:
  return os.path.join(workdir, "ablate.pid")


def in_use(workdir: str) -> bool:
  """True while another harness's training process (pid in ablate.pid) is alive."""
  try:
    with open(_lock_path(workdir), encoding="utf-8") as f:
      os.kill(int(f.read().strip()), 0)
    return True
  except (OSError, ValueError):
    return False


def summarise_run(workdir: str, steps: int) -> dict:
  rows = read_metrics(workdir)
  val = [r for r in rows if "val/loss" in r and r["step"] == steps]
  train_rows = [r for r in rows if "loss/cross_entropy" in r]
  # The first logged interval includes compilation; skip it for the speed.
  speeds = [r["tokens_per_second"] for r in train_rows[1:] if "tokens_per_second" in r]
  last = train_rows[-1] if train_rows else {}
  return {"val_loss": val[-1]["val/loss"] if val else None,
          "tokens_per_second": statistics.median(speeds) if speeds else None,
          "curve": [(r["step"], r["loss/cross_entropy"]) for r in train_rows],
          "diagnostics": {k: last[k] for k in DIAGNOSTICS if k in last},
          "val_dead": val[-1].get("val/dead_prototypes") if val else None}


def _mean(xs):
  xs = [x for x in xs if x is not None]
  return statistics.fmean(xs) if xs else None


def summarise(runs: dict, steps: int) -> dict:
  """variant -> mean val loss, spread, speed and diagnostics over its seeds."""
  out = {}
  for variant, by_seed in runs.items():
    summaries = {seed: summarise_run(w, steps) for seed, w in by_seed.items()}
    losses = [s["val_loss"] for s in summaries.values() if s["val_loss"] is not None]
    diag_keys = {k for s in summaries.values() for k in s["diagnostics"]}
    out[variant] = {
        "seeds": sorted(seed for seed, s in summaries.items() if s["val_loss"] is not None),
        "val_loss": _mean(losses),
        "spread": (max(losses) - min(losses)) if len(losses) > 1 else None,
        "per_seed": {seed: s["val_loss"] for seed, s in summaries.items()},
        "tokens_per_second": _mean([s["tokens_per_second"] for s in summaries.values()]),
        "diagnostics": {k: _mean([s["diagnostics"].get(k) for s in summaries.values()])
                        for k in diag_keys},
        "val_dead": _mean([s["val_dead"] for s in summaries.values()]),
        "curves": {seed: s["curve"] for seed, s in summaries.items()},
    }
  return out


def _fmt(x, spec=".3f"):
  return "-" if x is None else format(x, spec)


def table(summary: dict, header: str) -> str:
  dense = summary.get("dense", {})
  lines = [header, "",
           "| variant | overrides | seeds | val loss | seed spread | gap vs dense | step ratio | "
           + " | ".join(_SHORT[k] for k in DIAGNOSTICS) + " | val dead |",
           "|" + "---|" * (8 + len(DIAGNOSTICS))]
  for variant, s in summary.items():
    # Paired: against dense at this variant's own seeds (same init seed, same data).
    dense_at = _mean([dense.get("per_seed", {}).get(seed) for seed in s["seeds"]])
    gap = None
    if dense_at and s["val_loss"] is not None:
      gap = 100.0 * (s["val_loss"] - dense_at) / dense_at
    ratio = None
    if dense.get("tokens_per_second") and s["tokens_per_second"]:
      ratio = dense["tokens_per_second"] / s["tokens_per_second"]
    per_seed = ", ".join(f"{seed}: {_fmt(v)}" for seed, v in sorted(s["per_seed"].items()))
    diags = " | ".join(_fmt(s["diagnostics"].get(k)) for k in DIAGNOSTICS)
    lines.append(f"| {variant} | {' '.join(VARIANTS.get(variant, [])) or '-'} | "
                 f"{','.join(map(str, s['seeds'])) or '-'} | {_fmt(s['val_loss'])} ({per_seed}) | "
                 f"{_fmt(s['spread'])} | {_fmt(gap, '+.1f')}% | {_fmt(ratio, '.2f')} | {diags} | "
                 f"{_fmt(s['val_dead'])} |")
  return "\n".join(lines) + "\n"


def plot(summary: dict, path: str, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = [v for v, s in summary.items() if s["val_loss"] is not None]
  fig, (bars, curves) = plt.subplots(1, 2, figsize=(14, 5.5))
  values = [summary[v]["val_loss"] for v in names]
  colours = ["grey" if v == "dense" else "tab:blue" for v in names]
  bars.barh(names, values, color=colours)
  if "dense" in summary and summary["dense"]["val_loss"]:
    bars.axvline(summary["dense"]["val_loss"], color="black", lw=0.8)
    bars.axvline(summary["dense"]["val_loss"] * 1.03, color="red", lw=0.8, ls="--",
                 label="dense + 3%")
    bars.legend(loc="lower right")
  lo = min(values) if values else 0
  bars.set_xlim(lo - 0.1, max(values) + 0.05 if values else 1)
  bars.set_xlabel("validation loss (mean over seeds)")
  bars.invert_yaxis()
  for v in names:
    for seed, curve in summary[v]["curves"].items():
      if not curve:
        continue
      steps, loss = zip(*curve)
      curves.plot(steps, loss, lw=1.2 if v == "dense" else 0.8,
                  color="black" if v == "dense" else None, label=f"{v} s{seed}")
  curves.set_xlabel("step")
  curves.set_ylabel("train cross-entropy (logged steps)")
  curves.set_ylim(top=7.0)
  curves.legend(fontsize=6, ncol=2)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  outputs.write_figure(path, fig, dpi=110)
  plt.close(fig)


@exit_on_user_error
def main(argv=None):
  p = common.OverridesParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", default="tiny", help="prism_SIZE vs dense_SIZE")
  p.add_argument("--steps", type=int, default=1000)
  p.add_argument("--seeds", type=int, nargs="+", default=[0])
  p.add_argument("--variants", nargs="+", default=None, help=f"default: all of {list(VARIANTS)}")
  p.add_argument("--jobs", type=int, default=2, help="training processes at once")
  p.add_argument("--no-train", action="store_true", help="only rescore finished runs")
  p.add_argument("--out", default="runs/ablate")
  p.add_argument("overrides", nargs="*", help="key=value applied to every run (dense too)")
  args = p.parse_args(argv)

  variants = args.variants or list(VARIANTS)
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown:
    p.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
  if "dense" not in variants:
    variants = ["dense", *variants]
  variant_args = {v: variant_overrides(v, args.size) for v in variants}  # refuse a bad size now
  root = os.path.join(args.out, f"{args.size}_{args.steps}")
  shared_args = [f"train.steps={args.steps}", f"train.eval_every={args.steps}",
            f"checkpoint.every={args.steps}", "train.progress=false", *args.overrides]
  runs = {v: {s: os.path.join(root, f"{v}_s{s}") for s in args.seeds} for v in variants}
  run_args = lambda v, seed: [*variant_args[v], *shared_args, f"train.seed={seed}"]
  exp_of = lambda v: f"{'dense' if v == 'dense' else 'prism'}_{args.size}"

  # A run made with other settings (another definition of its variant, other extra
  # overrides) must not stand in for this one in the table, nor be trained over.
  for v, by_seed in runs.items():
    for seed, workdir in by_seed.items():
      why = other_settings(workdir, exp_of(v), run_args(v, seed))
      if why:
        raise UserError(f"{workdir} holds a run made with {why} (the {v} variant's "
                        "definition or the extra overrides changed since): move it away or "
                        "give another --out")

  # Skip runs that are finished, or being trained by another harness right now.
  todo = [(v, s, w) for v, by_seed in runs.items() for s, w in by_seed.items()
          if not finished(w, args.steps) and not in_use(w)]
  if todo and not args.no_train:
    running: list[tuple[str, subprocess.Popen]] = []
    while todo or running:
      while todo and len(running) < args.jobs:
        variant, seed, workdir = todo.pop(0)
        cmd = ["nice", "-n", "10", *train_command(
            exp_of(variant), workdir, run_args(variant, seed))]
        os.makedirs(workdir, exist_ok=True)
        log = open(os.path.join(workdir, "train.log"), "a", encoding="utf-8")
        print(f"[ablate] start {variant} seed {seed}: {' '.join(cmd)}", flush=True)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        with open(_lock_path(workdir), "w", encoding="utf-8") as f:
          f.write(str(proc.pid))
        running.append((workdir, proc))
      time.sleep(5)
      for item in list(running):
        if item[1].poll() is not None:
          running.remove(item)
          print(f"[ablate] done {item[0]} (rc {item[1].returncode})", flush=True)

  summary = summarise(runs, args.steps)
  base = experiments.get(f"dense_{args.size}")
  data = base.data
  cfg_line = (f"prism_{args.size} variants vs dense_{args.size}, {args.steps} steps x "
              f"{data.batch_size * data.seq_len} tokens (batch {data.batch_size} x "
              f"{data.seq_len}), seeds {args.seeds}, measured on a shared "
              f"{os.cpu_count()}-core CPU ({platform.machine()}); extra overrides: "
              f"{' '.join(args.overrides) or 'none'}")
  header = (f"## Ablation: {cfg_line}\n\n"
            "overrides: changes to the round-one head (benchmarks/ablate.py ROUND_ONE_HEAD; "
            "`defaults` is the experiment as configured); "
            f"val loss: final validation loss ({base.train.eval_batches} batches); gap: "
            "(variant - dense) / dense, dense averaged over the variant's own seeds; "
            "step ratio: median dense tokens/s / median variant tokens/s while sharing the "
            "machine (indicative); diagnostics: last logged train step (batch-level, see "
            "prism_jax/diagnostics.py); val dead: prototypes unused on the validation batches.")
  md = table(summary, header)
  outputs.write_text(os.path.join(root, "ablation.md"), md)
  plot(summary, os.path.join(root, "ablation.png"), cfg_line)
  print(md)
  print(f"wrote {os.path.join(root, 'ablation.md')} and ablation.png")


if __name__ == "__main__":
  main()
