"""Train a PRISM or dense language model: `python -m prism_jax.train --exp prism_tiny`.

data -> model -> optimizer -> Orbax checkpoints (state + input position) + TensorBoard
and JSONL metrics + a progress bar. Starting again in the same workdir resumes from the
latest complete checkpoint, data iterator included, so an interrupted run continues
exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Callable, Iterable, Iterator

import jax
import numpy as np
from tqdm import tqdm

from prism_jax import cli, sharding
from prism_jax.checkpoint import Checkpointer, abstract_with_sharding
from prism_jax.config import ExperimentConfig
from prism_jax.errors import UserError, exit_on_user_error
from prism_jax.metrics_log import MetricsLog
from prism_jax.step import CompiledSteps, compile_steps, to_global_batch


@dataclasses.dataclass
class TrainData:
  """A checkpointable iterator of host-local training batches, and validation batches."""
  train_iterator: Iterator[dict]
  eval_batches: Callable[[], Iterable[dict]]


def corpus_data(cfg: ExperimentConfig) -> TrainData:
  """The configured tfds dataset + tokenizer through the grain pipeline."""
  from prism_jax import data as data_lib

  bundle = data_lib.prepare(cfg.data, cfg.model.vocab_size)
  kwargs = dict(process_index=jax.process_index(), process_count=jax.process_count())
  train_iterator = data_lib.make_train_iterator(cfg.data, bundle.tokenizer, bundle.train_source,
                                                **kwargs)
  return TrainData(
      train_iterator=train_iterator,
      eval_batches=lambda: data_lib.iterate_eval_batches(
          cfg.data, bundle.tokenizer, bundle.validation_source,
          num_batches=cfg.train.eval_batches, **kwargs))


def validation_metrics(steps: CompiledSteps, params, batches: Iterable[dict]) -> dict:
  """Token-weighted validation loss, perplexity and (PRISM) dead-prototype fraction."""
  totals = None
  for local in batches:
    sums = steps.eval_step(params, to_global_batch(local, steps.batch_sharding))
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  if totals is None:
    raise UserError("the validation split produced no batches")
  totals = jax.device_get(totals)
  loss = float(totals["loss_sum"] / max(totals["tokens"], 1.0))
  metrics = {"val/loss": loss, "val/perplexity": math.exp(min(loss, 50.0)),
             "val/tokens": float(totals["tokens"])}
  if "usage" in totals:
    metrics["val/dead_prototypes"] = float(np.mean(totals["usage"] == 0))
  return metrics


class _Throughput:
  """Tokens/s between consecutive reports."""

  def __init__(self, start_step: int):
    self.step, self.time = start_step, time.perf_counter()

  def update(self, step: int, tokens_per_step: float) -> float:
    now = time.perf_counter()
    rate = (step - self.step) * tokens_per_step / max(now - self.time, 1e-9)
    self.step, self.time = step, now
    return rate


def train(cfg: ExperimentConfig, workdir: str, data: TrainData | None = None) -> dict:
  """Runs (or resumes) training to `cfg.train.steps`; returns the last metrics."""
  cli.write_or_check_run_config(cfg, workdir)
  data = data or corpus_data(cfg)
  mesh = sharding.make_mesh(cfg.mesh)
  steps = compile_steps(cfg, mesh)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), cfg.checkpoint)
  log = MetricsLog(workdir)
  is_main = jax.process_index() == 0
  try:
    state = _restore_or_init(steps, checkpointer, data, is_main)
    start = int(jax.device_get(state.step))
    total = cfg.train.steps
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    progress = tqdm(total=total, initial=start, desc=cfg.name, unit="step", dynamic_ncols=True,
                    disable=not (cfg.train.progress and is_main), file=sys.stdout)
    speed = _Throughput(start)
    last_train, last_val, pending = {}, {}, None

    def report(step, metrics):
      # Called one step late, so fetching metrics never stalls the device.
      metrics = {k: v for k, v in jax.device_get(metrics).items() if np.ndim(v) == 0}
      if not math.isfinite(float(metrics["loss/total"])):
        raise UserError(f"non-finite loss at step {step}; last checkpoint: "
                        f"{checkpointer.latest_step()} in {checkpointer.directory}")
      metrics["tokens_per_second"] = speed.update(step, tokens_per_step)
      log.write(step, metrics)
      progress.set_postfix(loss=f"{metrics['loss/cross_entropy']:.3f}",
                           tok_s=f"{metrics['tokens_per_second']:.0f}")
      return metrics

    for step in range(start + 1, total + 1):
      batch = to_global_batch(next(data.train_iterator), steps.batch_sharding)
      state, metrics = steps.train_step(state, batch)
      if pending is not None:
        last_train = report(*pending)
      pending = (step, metrics) if step % cfg.train.log_every == 0 or step == total else None
      progress.update(1)
      if step % cfg.train.eval_every == 0 or step == total:
        val = validation_metrics(steps, state.params, data.eval_batches())
        log.write(step, val)
        last_val = val
        progress.write(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in val.items()))
      if step % cfg.checkpoint.every == 0 or step == total:
        checkpointer.save(step, state, data.train_iterator, force=True)
    if pending is not None:
      last_train = report(*pending)
    progress.close()
    return {**last_train, **last_val, "step": int(jax.device_get(state.step)),
            "final_state": state}
  finally:
    checkpointer.close()
    log.close()


def _restore_or_init(steps: CompiledSteps, checkpointer: Checkpointer, data: TrainData,
                     is_main: bool):
  latest = checkpointer.latest_step()
  if latest is None:
    return steps.init()
  if is_main:
    print(f"resuming from step {latest} in {checkpointer.directory}", flush=True)
  target = abstract_with_sharding(steps.abstract_state, steps.state_sharding)
  return checkpointer.restore(latest, target, data.train_iterator)


@exit_on_user_error
def main(argv=None):
  parser = cli.base_parser(__doc__.splitlines()[0])
  args = parser.parse_args(argv)
  cfg, workdir = cli.resolve(args)
  started = time.perf_counter()
  result = train(cfg, workdir)
  elapsed = time.perf_counter() - started
  shown = {k: v for k, v in result.items() if k.startswith("val/") or k == "step"}
  print(f"done in {elapsed:.0f}s: " + ", ".join(f"{k}={v:.4g}" for k, v in shown.items()))
  print(f"checkpoints: {os.path.join(workdir, 'checkpoints')}  "
        f"tensorboard: {os.path.join(workdir, 'tensorboard')}")


if __name__ == "__main__":
  main()
