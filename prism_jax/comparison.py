"""The PRISM-vs-dense study (entry point: `python -m prism_jax.main.compare`).

Trains (or resumes / reuses) the PRISM experiment and its dense twin with the same data,
tokens and seed, evaluates both the same way, and writes a side-by-side table (validation
loss, bits per byte, each task's accuracy, average accuracy, train-step time) as Markdown and
JSON plus a loss-curve plot (PNG) under --workdir (default runs/compare).
"""

from __future__ import annotations

import json
import statistics

from etils import epath

from prism_jax import evaluation, layout, outputs, restore
from prism_jax.config import ExperimentConfig, to_dict
from prism_jax.errors import UserError
from prism_jax.metrics_log import read_jsonl

# Keys that may differ between the twins: everything else must match for a fair study.
_HEAD_ONLY = ("name", "model.head")


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def check_matched(prism: ExperimentConfig, dense: ExperimentConfig) -> None:
  """Same data, tokens, seed, optimizer and backbone; only the head differs."""
  a, b = _flat(to_dict(prism)), _flat(to_dict(dense))
  differ = sorted(k for k in a if a[k] != b.get(k) and k not in _HEAD_ONLY
                  and not k.startswith(("prototypes.", "losses.")))
  if differ:
    raise UserError(f"{prism.name} and {dense.name} are not matched: they differ in "
                    f"{', '.join(differ)}")
  if prism.model.head != "prism" or dense.model.head != "dense":
    raise UserError(f"compare needs a PRISM and a dense experiment, got {prism.model.head} "
                    f"and {dense.model.head}")


def step_seconds(workdir: str, tokens_per_step: int) -> float | None:
  """Median train-step time from the run's logged tokens/s (the first report, which includes
  compilation, is left out)."""
  path = layout.path(workdir, layout.METRICS)
  if not epath.Path(path).is_file():
    return None
  rates = [r["tokens_per_second"] for r in read_jsonl(path) if "tokens_per_second" in r]
  rates = rates[1:] if len(rates) > 1 else rates
  return tokens_per_step / statistics.median(rates) if rates else None


def loss_curves(workdir: str) -> dict[str, list[tuple[int, float]]]:
  rows = read_jsonl(layout.path(workdir, layout.METRICS))
  curves = {"train": [(r["step"], r["loss/cross_entropy"]) for r in rows
                      if "loss/cross_entropy" in r],
            "validation": [(r["step"], r["val/loss"]) for r in rows if "val/loss" in r]}
  return {k: sorted(dict(v).items()) for k, v in curves.items()}  # resumed runs: last wins


def plot_loss_curves(runs: dict[str, str], path: str) -> str:
  """PNG of train (thin) and validation (markers) cross-entropy of each run."""
  try:
    import matplotlib
  except ImportError:
    raise UserError("the loss plot needs matplotlib: run `make compare` (it installs it) or "
                    "pip install matplotlib") from None
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
  for (name, workdir), color in zip(runs.items(), ("tab:red", "tab:blue", "tab:green")):
    curves = loss_curves(workdir)
    if curves["train"]:
      ax.plot(*zip(*curves["train"]), color=color, alpha=0.6, lw=1, label=f"{name} train")
    if curves["validation"]:
      ax.plot(*zip(*curves["validation"]), "o-", color=color, lw=2, label=f"{name} validation")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats/token)")
  ax.set_title("PRISM vs dense")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  outputs.write_figure(path, fig)  # whole, to a local folder or a bucket
  plt.close(fig)
  return path


def markdown_table(study: dict) -> str:
  names = list(study["runs"])
  rows = [("validation loss", "val_loss", "{:.4f}"), ("bits per byte", "bits_per_byte", "{:.4f}"),
          ("perplexity", "perplexity", "{:.2f}")]
  lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
  for title, key, fmt in rows:
    lines.append(f"| {title} | " + " | ".join(fmt.format(study["runs"][n][key]) for n in names)
                 + " |")
  tasks = list(study["runs"][names[0]].get("tasks", {}))
  for task in tasks:
    cells = []
    for n in names:
      m = study["runs"][n]["tasks"][task]
      cell = f"{m['accuracy']:.3f} ± {m['accuracy_stderr']:.3f}"
      if "accuracy_per_char" in m:
        cell += f" (per char {m['accuracy_per_char']:.3f})"
      cells.append(cell)
    lines.append(f"| {task} | " + " | ".join(cells) + " |")
  if tasks:
    lines.append("| average accuracy | " + " | ".join(
        f"{study['runs'][n]['average_accuracy']:.3f} (per char "
        f"{study['runs'][n]['average_accuracy_per_char']:.3f})" for n in names) + " |")
  lines.append("| train step (s) | " + " | ".join(
      "-" if study["runs"][n]["step_seconds"] is None else
      f"{study['runs'][n]['step_seconds']:.3f}" for n in names) + " |")
  ratio = study.get("step_time_ratio")
  scored = (f"tasks scored on {study['limit'] or 'all'} documents each" if tasks
            else "no downstream task scored")
  footer = [f"\nSteps: {study['steps']}, tokens per step: {study['tokens_per_step']}, seed "
            f"{study['seed']}; {scored}."]
  if ratio:
    footer.append(f"PRISM / dense train-step time: {ratio:.3f}.")
  return "\n".join(lines + footer) + "\n"


# compare's evaluations have a file of their own (evaluate's are never read back)
COMPARE_TAGS = ("compare",)


def _earlier_evaluation(run_dir: str, step: int, request: dict) -> dict | None:
  """The results an earlier compare wrote for this step and these settings, else None
  (`evaluate`'s own files, other settings and unreadable files are never reused)."""
  path = epath.Path(evaluation.results_path(run_dir, step, COMPARE_TAGS))
  try:
    results = json.loads(path.read_text())
  except (OSError, ValueError):
    return None
  if not isinstance(results, dict) or results.get("step") != step:
    return None
  return results if results.get("compare_request") == request else None


def run_study(prism_cfg: ExperimentConfig, dense_cfg: ExperimentConfig, workdir: str,
              tasks: list, limit: int | None, val_batches: int | None,
              task_root: str | None = None, train_data=None, tokenizer=None,
              validation=None, progress: bool = True) -> dict | None:
  """Trains/reuses both runs, evaluates both, writes compare.{md,json} and loss_curves.png.

  Rerun after an interruption, it resumes training and reuses an evaluation it finished
  (same checkpoint, validation batches, tasks and limit). Returns None, writing no table, when
  training was stopped (SIGTERM, a first Ctrl-C) before its last step.

  `train_data`, `tokenizer` and `validation` (a callable cfg -> batches) replace the corpus
  for tests; by default both come from the configured data.
  """
  from prism_jax.training import train

  check_matched(prism_cfg, dense_cfg)
  study = {"steps": prism_cfg.train.steps, "seed": prism_cfg.train.seed, "limit": limit,
           "tokens_per_step": prism_cfg.data.batch_size * prism_cfg.data.seq_len, "runs": {}}
  run_dirs = {}
  for cfg in (prism_cfg, dense_cfg):
    run_dir = layout.path(workdir, cfg.name)
    run_dirs[cfg.name] = run_dir
    print(f"== {cfg.name}: training to step {cfg.train.steps} in {run_dir}", flush=True)
    trained = train(cfg, run_dir, train_data(cfg) if train_data else None)
    if trained["preempted"]:  # SIGTERM or Ctrl-C: saved; scoring a half-trained run misleads
      print(f"== {cfg.name}: stopped at step {trained['step']} of {cfg.train.steps}; run the "
            "same command again to resume", flush=True)
      return None
    graphdef, params, step = restore.load_params(cfg, run_dir)
    if tokenizer is None:
      from prism_jax import data as data_lib

      bundle = data_lib.prepare(cfg.data, cfg.model.vocab_size)
      tok, batches = bundle.tokenizer, evaluation.validation_batches(cfg, bundle, val_batches)
    else:
      tok, batches = tokenizer, validation(cfg)
    # the checkpoint's commit time: a run deleted and trained again to this step is new
    request = {"val_batches": val_batches, "tasks": [t.name for t in tasks], "limit": limit,
               "checkpoint_saved_ns": restore.checkpoint_saved_ns(cfg, run_dir, step)}
    results = _earlier_evaluation(run_dir, step, request)
    if results is not None:  # a rerun after an interruption: each run is scored once
      print(f"== {cfg.name}: step {step} was evaluated already (eval/step_{step}.compare.json)",
            flush=True)
    else:
      print(f"== {cfg.name}: evaluating step {step}", flush=True)
      results = evaluation.evaluate(cfg, graphdef, params, tok, validation_batches=batches,
                                    tasks=tasks, limit=limit, task_root=task_root,
                                    progress=progress)
      results.update(step=step, compare_request=request)
      evaluation.write_results(results, evaluation.results_path(run_dir, step, COMPARE_TAGS))
    print(evaluation.format_table(results), flush=True)
    val = results["validation"]
    study["runs"][cfg.name] = {
        "head": cfg.model.head, "step": step, "val_loss": val["loss"],
        "perplexity": val["perplexity"], "bits_per_byte": val["bits_per_byte"],
        "tasks": results.get("tasks", {}),
        "average_accuracy": results.get("average_accuracy"),
        "average_accuracy_per_char": results.get("average_accuracy_per_char"),
        "step_seconds": step_seconds(run_dir, study["tokens_per_step"]),
        "eval_seconds": results["seconds"]}
  prism_s = study["runs"][prism_cfg.name]["step_seconds"]
  dense_s = study["runs"][dense_cfg.name]["step_seconds"]
  study["step_time_ratio"] = prism_s / dense_s if prism_s and dense_s else None
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  study["plot"] = plot_loss_curves(run_dirs, layout.path(workdir, "loss_curves.png"))
  outputs.write_json(layout.path(workdir, "compare.json"), study)
  outputs.write_text(layout.path(workdir, "compare.md"),
                     f"# {prism_cfg.name} vs {dense_cfg.name}\n\n" + markdown_table(study)
                     + "\n![loss curves](loss_curves.png)\n")
  return study
