"""The two control studies the `control` command runs (prism_jax/main/control.py):

  calibrate_task    fit a controller on one task's calibration split, held-out accuracy
                    before/after, the prototypes that carry it
  measure_suppression  a word family's rate and the loss with and without a prototype mask

plus the prototype cards they describe prototypes with, and their reports.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Callable, Iterable, Sequence

import numpy as np

from prism_jax import sampling
from prism_jax.control import controller as ctl
from prism_jax.control import records
from prism_jax.control import suppress as sup
from prism_jax.control import tasks as task_lib
from prism_jax.models import lm


def prototype_cards(workdir: str, params, tokenizer, step: int, saved_ns: int | None) -> dict:
  """The explorer's cards by prototype id, when they describe the checkpoint in use (`step`,
  committed at `saved_ns`); else top-token labels of these parameters."""
  from prism_jax.explore import labels

  saved = labels.load_labels(workdir)
  if saved is not None:
    cards, made = saved
    why = records.other_checkpoint(made, step, saved_ns)
    if why is None:
      return cards
    print(f"note: {labels.labels_path(workdir)} was made on {why}; labelling by top tokens "
          "instead (run explore on this checkpoint for its labels)", file=sys.stderr)
  # No explorer run of this checkpoint: label by top tokens only (cheap, no index needed).
  return {c["id"]: c for c in labels.label_prototypes(params, tokenizer, None, num_tokens=5)}


def describe(rows, cards, index, spans: int = 2) -> list[dict]:
  """Adds each prototype's label, category and training neighbourhood to its row."""
  from prism_jax.explore.labels import neighbourhood_spans

  for row in rows:
    card = cards.get(row["prototype"], {})
    row["label"] = card.get("label", "")
    row["category"] = card.get("category", "")
    row["neighbourhood"] = neighbourhood_spans(index, row["prototype"], spans)
  return rows


# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Calibration:
  """What calibrating a controller on one task needs besides the task's documents."""
  cfg: object
  graphdef: object
  params: object
  tokenizer: object
  workdir: str
  step: int
  fit: ctl.FitConfig
  calibration_fraction: float = 0.5
  split_seed: int = 0
  batch_size: int = 32
  show: int = 8
  progress: bool = True
  saved_ns: int | None = None  # the checkpoint's commit time (Checkpointer.saved_ns)


def calibrate_task(setup: Calibration, name: str, examples: Sequence, cards, index) -> dict:
  """Fits, measures and saves one task's controller; the task's report as a dict."""
  cfg, graphdef, params, tokenizer = setup.cfg, setup.graphdef, setup.params, setup.tokenizer
  started = time.perf_counter()
  values, unembed = params["prototype_head"]["values"], lm.unembedding(params)
  m, seq = cfg.prototypes.num_prototypes, cfg.model.max_seq_len
  task_lib.check_split(name, len(examples), setup.calibration_fraction)
  cal, held = task_lib.split(examples, setup.calibration_fraction, setup.split_seed)
  feats = task_lib.features(graphdef, params, cal, tokenizer, seq, setup.batch_size,
                            setup.progress)
  controller, losses = ctl.fit(feats, values, unembed, m, setup.fit, setup.progress)
  score_fn = task_lib.make_score_fn(graphdef)
  before, correct_before = task_lib.accuracy(score_fn, params, None, held, tokenizer, seq,
                                             setup.batch_size, f"{name} before", setup.progress)
  after, correct_after = task_lib.accuracy(score_fn, params, controller, held, tokenizer, seq,
                                           setup.batch_size, f"{name} after", setup.progress)
  diff = correct_after - correct_before
  result = {
      "step": setup.step, "checkpoint_saved_ns": setup.saved_ns,
      "calibration_examples": len(cal), "heldout_examples": len(held),
      "heldout_before": before, "heldout_after": after,
      "heldout_gain": float(np.mean(diff)),
      # Paired: the same documents before and after, so the difference's own error.
      "heldout_gain_stderr": float(np.std(diff, ddof=1) / np.sqrt(len(diff))),
      "calibration_accuracy_before": ctl.accuracy(ctl.zeros(m), values, unembed, feats),
      "calibration_accuracy_after": ctl.accuracy(controller, values, unembed, feats),
      "nonzero_gains": int(np.count_nonzero(np.asarray(controller.gain_M))),
      "nonzero_biases": int(np.count_nonzero(np.asarray(controller.bias_M))),
      "fit_loss_first": losses[0], "fit_loss_last": float(np.mean(losses[-10:])),
      "prototypes": describe(ctl.strongest(controller, setup.show), cards, index),
      "seconds": time.perf_counter() - started,
  }
  result["controller"] = ctl.save(
      ctl.default_path(setup.workdir, name), controller,
      {"experiment": cfg.name, "step": setup.step, "checkpoint_saved_ns": setup.saved_ns,
       "task": name,
       "fit": dataclasses.asdict(setup.fit),
       "heldout_before": before["accuracy"], "heldout_after": after["accuracy"]})
  return result


def _fmt_acc(m: dict) -> str:
  return f"{m['accuracy']:.3f} ± {m['accuracy_stderr']:.3f}"


def format_calibration(name: str, r: dict) -> str:
  lines = [f"{name}: calibration {r['calibration_examples']} docs "
           f"({r['calibration_accuracy_before']:.3f} -> {r['calibration_accuracy_after']:.3f}), "
           f"held-out {r['heldout_examples']} docs",
           f"  held-out accuracy  before {_fmt_acc(r['heldout_before'])}   after "
           f"{_fmt_acc(r['heldout_after'])}   change {r['heldout_gain']:+.3f} ± "
           f"{r['heldout_gain_stderr']:.3f} (paired)",
           f"  acc per char       before {r['heldout_before']['accuracy_per_char']:.3f}   "
           f"after {r['heldout_after']['accuracy_per_char']:.3f}",
           f"  non-zero gains {r['nonzero_gains']}, biases {r['nonzero_biases']}; "
           f"controller: {r['controller']}"]
  for row in r["prototypes"]:
    lines.append(f"  p{row['prototype']:<5} g={row['gain']:+.3f} b={row['bias']:+.3f} "
                 f"[{row['category']}] {row['label']}")
    for span in row["neighbourhood"]:
      lines.append(f"         | {span!r}")
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------


def measure_suppression(cfg, graphdef, params, tokenizer, mask, family,
                        batches: Callable[[], Iterable[dict]], *, prompts: Sequence[str] = (),
                        samples: int = 16, gen_tokens: int = 24, temperature: float = 1.0,
                        progress: bool = True) -> tuple[dict, dict]:
  """(before, after): the family's rate and the loss on `batches()` without and with the
  mask; with `prompts`, also how often sampled continuations mention the family."""
  fn = sup.make_measure_fn(graphdef)
  before = sup.measure(fn, params, None, family, batches(), progress, "before")
  after = sup.measure(fn, params, mask, family, batches(), progress, "after")
  if prompts:
    how = sampling.Sampling(temperature=temperature)
    for measured, suppressed in ((before, None), (after, mask)):
      gen = sampling.Generator(graphdef, cfg, how, suppressed_M=suppressed)
      measured["generation"] = sup.mention_rate(gen, params, tokenizer, prompts, family,
                                                samples, gen_tokens)
  return before, after


def format_suppression(r: dict) -> str:
  b, a = r["before"], r["after"]
  lines = [f"suppressing {len(r['prototypes'])} prototypes: "
           + ", ".join(f"p{p['prototype']}" for p in r["prototypes"])]
  for p in r["prototypes"][:12]:
    lines.append(f"  p{p['prototype']:<5} [{p['category']}] {p['label']}"
                 + (f"  | {p['neighbourhood'][0]!r}" if p["neighbourhood"] else ""))
  lines += [
      f"word family {r['words']} ({r['family_tokens']} tokens), {b['tokens']} tokens of "
      f"{r['measured_on']}",
      f"  probability mass       {b['family_probability_mass']:.5f} -> "
      f"{a['family_probability_mass']:.5f}",
      f"  top-1 rate             {b['family_top1_rate']:.5f} -> {a['family_top1_rate']:.5f}",
      f"  log P(family | it is next) {b['family_target_logprob']:.3f} -> "
      f"{a['family_target_logprob']:.3f}  ({b['family_target_positions']} positions)",
      f"  loss                   {b['loss']:.4f} -> {a['loss']:.4f} "
      f"({r['loss_change']:+.4f})",
  ]
  if "generation" in b:
    bg, ag = b["generation"], a["generation"]
    lines += [f"  generations mentioning it {bg['mention_rate']:.3f} -> {ag['mention_rate']:.3f} "
              f"({bg['generations']} sampled continuations), family share of generated tokens "
              f"{bg['family_token_share']:.4f} -> {ag['family_token_share']:.4f}"]
  lines += [f"saved: {r['path']}"]
  return "\n".join(lines)
