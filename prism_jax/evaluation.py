"""What evaluate measures (entry point: `python -m prism_jax.main.evaluate`):
  - validation loss, perplexity and bits per byte (nats / ln 2 / UTF-8 bytes of the text, so
    comparable across tokenizers) on the validation split, or on a UTF-8 `--text-file`;
  - zero-shot accuracy, raw and per-character normalised, with standard errors, on the
    downstream tasks (`--tasks hellaswag piqa ...`, default all; `--tasks none` skips them);
as a dict, a plain-text table, and JSON in <workdir>/eval/step_<N>[.<tags>].json.
"""

from __future__ import annotations

import math
import re
import time
from typing import Callable, Iterable, Iterator, Sequence

import jax
import numpy as np
from etils import epath
from tqdm import tqdm

from prism_jax import downstream, layout, outputs
from prism_jax.config import ExperimentConfig
from prism_jax.downstream import special_id
from prism_jax.errors import UserError
from prism_jax.step import BATCH_KEYS, make_eval_step

# ------------------------------------------------------------------------------------------
# Language-model metrics


def target_bytes(tokenizer, batch: dict) -> int:
  """UTF-8 bytes of the text whose tokens are scored (targets under loss_mask), per document."""
  total = 0
  targets, mask, segments = (np.asarray(batch[k]) for k in ("targets", "loss_mask",
                                                            "segment_ids"))
  for row in range(targets.shape[0]):
    for segment in np.unique(segments[row][mask[row] > 0]):
      ids = targets[row][(segments[row] == segment) & (mask[row] > 0)]
      total += len(tokenizer.decode(ids.tolist()).encode("utf-8"))
  return total


def text_batches(tokenizer, text: str, seq_len: int, batch_size: int) -> Iterator[dict]:
  """A text as consecutive windows of seq_len + 1 tokens that overlap by one, so that every
  token after the first is predicted exactly once; the last batch is padded with masked rows."""
  ids = list(tokenizer.encode(text))
  bos = special_id(tokenizer, "bos_id")
  ids = ([bos] if bos is not None else []) + ids
  if len(ids) < 2:
    raise UserError("the text is too short to score (fewer than two tokens)")
  windows = [ids[s:s + seq_len + 1] for s in range(0, len(ids) - 1, seq_len)]
  for start in range(0, len(windows), batch_size):
    batch = {k: np.zeros((batch_size, seq_len), np.float32 if k == "loss_mask" else np.int32)
             for k in BATCH_KEYS}
    batch["positions"][:] = np.arange(seq_len)
    for row, window in enumerate(windows[start:start + batch_size]):
      n = len(window) - 1
      batch["inputs"][row, :n], batch["targets"][row, :n] = window[:-1], window[1:]
      batch["segment_ids"][row, :n], batch["loss_mask"][row, :n] = 1, 1.0
    yield batch


def language_model_metrics(eval_fn, params, batches: Iterable[dict],
                           bytes_of: Callable[[dict], int] | None = None,
                           total_bytes: int | None = None, progress: bool = True,
                           desc: str = "loss") -> dict:
  """Token-weighted loss, perplexity and bits per byte; (PRISM) dead-prototype fraction.

  Bytes come from `bytes_of(batch)` summed, or `total_bytes` when the text is known whole.
  """
  nats, tokens, num_bytes, usage = 0.0, 0.0, 0, None
  for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
    sums = jax.device_get(eval_fn(params, {k: batch[k] for k in BATCH_KEYS}))
    nats += float(sums["loss_sum"])
    tokens += float(sums["tokens"])
    num_bytes += bytes_of(batch) if bytes_of else 0
    if "usage" in sums:
      usage = sums["usage"] if usage is None else usage + sums["usage"]
  if tokens == 0:
    raise UserError("nothing to score: the evaluation text produced no tokens")
  loss = nats / tokens
  num_bytes = num_bytes if total_bytes is None else total_bytes
  metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
             "bits_per_byte": nats / math.log(2) / max(num_bytes, 1),
             "tokens": int(tokens), "bytes": int(num_bytes)}
  if usage is not None:
    metrics["dead_prototypes"] = float(np.mean(np.asarray(usage) == 0))
  return metrics


def read_text_file(path: str) -> str:
  """A UTF-8 text file, local or in a bucket (epath)."""
  if epath.Path(path).is_dir():
    raise UserError(f"--text-file {path} is a folder; give one UTF-8 text file")
  if not epath.Path(path).is_file():
    raise UserError(f"--text-file {path} does not exist")
  try:
    return epath.Path(path).read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise UserError(f"--text-file {path} is not UTF-8 text (byte {e.start})") from None


# ------------------------------------------------------------------------------------------
# The whole evaluation


def evaluate(cfg: ExperimentConfig, graphdef, params, tokenizer, *,
             validation_batches: Iterable[dict] | None = None, text: str | None = None,
             tasks: Sequence[downstream.TaskSpec] = (), limit: int | None = None,
             batch_size: int = 32, task_root: str | None = None,
             progress: bool = True, interventions: dict | None = None) -> dict:
  """Every requested measurement as one JSON-able dict.

  `interventions`: {'controller': ..., 'suppressed_M': ...} (prism_jax.control.interventions),
  or None for the model as trained.
  """
  started = time.perf_counter()
  interventions = interventions or {}
  results: dict = {"experiment": cfg.name, "head": cfg.model.head}
  eval_fn = jax.jit(make_eval_step(graphdef, cfg, **interventions))
  if validation_batches is not None:
    results["validation"] = language_model_metrics(
        eval_fn, params, validation_batches, bytes_of=lambda b: target_bytes(tokenizer, b),
        progress=progress, desc="validation")
  if text is not None:
    # Every token of the file is scored (with BOS, the first too): count all its bytes.
    results["text_file"] = language_model_metrics(
        eval_fn, params, text_batches(tokenizer, text, cfg.data.seq_len, cfg.data.batch_size),
        total_bytes=len(text.encode("utf-8")), progress=progress, desc="text file")
  if tasks:
    task_results = downstream.run_tasks(tasks, graphdef, params, tokenizer,
                                        cfg.model.max_seq_len, limit=limit,
                                        batch_size=batch_size, root=task_root,
                                        progress=progress, interventions=interventions)
    results["tasks"] = {r.name: r.metrics for r in task_results}
    accuracies = [r.metrics["accuracy"] for r in task_results]
    normalised = [r.metrics.get("accuracy_per_char", r.metrics["accuracy"])
                  for r in task_results]
    results["average_accuracy"] = float(np.mean(accuracies))
    results["average_accuracy_per_char"] = float(np.mean(normalised))
    results["limit"] = limit
  results["seconds"] = time.perf_counter() - started
  return results


def format_table(results: dict) -> str:
  """A plain-text table of everything in `results`."""
  lines = [f"{results['experiment']} ({results['head']} head)"
           + (f", step {results['step']}" if "step" in results else "")]
  for section, title in (("validation", "validation split"), ("text_file", "text file")):
    if section in results:
      m = results[section]
      extra = (f"  dead prototypes {m['dead_prototypes']:.1%}" if "dead_prototypes" in m else "")
      lines.append(f"{title:17} loss {m['loss']:.4f}  perplexity {m['perplexity']:.2f}  "
                   f"bits/byte {m['bits_per_byte']:.4f}  ({m['tokens']} tokens, "
                   f"{m['bytes']} bytes){extra}")
  if "tasks" in results:
    lines.append(f"{'task':15} {'n':>6} {'accuracy':>16} {'acc per char':>16}")
    for name, m in results["tasks"].items():
      norm = (f"{m['accuracy_per_char']:.3f} ± {m['accuracy_per_char_stderr']:.3f}"
              if "accuracy_per_char" in m else "-")
      lines.append(f"{name:15} {m['examples']:>6} {m['accuracy']:>8.3f} ± "
                   f"{m['accuracy_stderr']:.3f} {norm:>16}")
    lines.append(f"{'average':15} {'':>6} {results['average_accuracy']:>8.3f}{'':8} "
                 f"{results['average_accuracy_per_char']:>8.3f}")
  lines.append(f"wall time {results['seconds']:.1f}s")
  return "\n".join(lines)


def results_path(workdir: str, step: int, tags: Sequence[str] = ()) -> str:
  """<workdir>/eval/step_<N>[.<tag>...].json (`request_tags` names the evaluation)."""
  return layout.path(workdir, layout.EVAL, ".".join([f"step_{step}", *tags, "json"]))


def request_tags(*, tasks: Sequence[str] | None = None, limit: int | None = None,
                 val_batches: int | None = None, text_file: str | None = None,
                 controller: str | None = None, suppress: str | None = None) -> list[str]:
  """What sets an evaluation apart from the default one (the validation batches of
  train.eval_batches and every task, as trained), as parts of its file name: a quick or an
  intervened evaluation never replaces another, and the same request replaces its own.

  `tasks`: the task names, None for all of them.
  """
  stem = lambda path: re.sub(r"[^A-Za-z0-9_-]+", "_", epath.Path(path).stem)[:40] or "_"
  tags = [f"text-{stem(text_file)}"] if text_file else []
  if tasks is not None and set(tasks) != set(downstream.TASKS):
    tags.append("tasks-" + ("+".join(sorted(tasks)) if tasks else "none"))
  tags += [f"limit-{limit}"] if limit is not None else []
  tags += [f"val-{val_batches}"] if val_batches is not None and not text_file else []
  tags += [f"controller-{stem(controller)}"] if controller else []
  tags += [f"suppress-{stem(suppress)}"] if suppress else []
  return tags


def write_results(results: dict, path: str) -> str:
  return outputs.write_json(path, results)


def validation_batches(cfg: ExperimentConfig, bundle, num_batches: int | None):
  from prism_jax import data as data_lib

  return data_lib.iterate_eval_batches(cfg.data, bundle.tokenizer, bundle.validation_source,
                                       num_batches=num_batches)
