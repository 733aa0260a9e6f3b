"""The training loop (entry point: `python -m prism_jax.main.train --exp prism_tiny`).

data -> model -> optimizer -> Orbax checkpoints (state + input position) + TensorBoard
and JSONL metrics + a progress bar. Starting again in the same workdir resumes from the
latest complete checkpoint, data iterator included, so an interrupted run continues
exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np
from tqdm import tqdm

from prism_jax import cli, distributed, layout, outputs, sharding, tokenizer_record
from prism_jax.checkpoint import (CheckpointMismatch, Checkpointer, CheckpointUnreachable,
                                  abstract_with_sharding, model_settings)
from prism_jax.config import ExperimentConfig
from prism_jax.errors import UserError
from prism_jax.metrics_log import MetricsLog
from prism_jax.step import CompiledSteps, compile_steps, to_global_batch


@dataclasses.dataclass
class TrainData:
  """A checkpointable iterator of host-local training batches, and validation batches."""
  train_iterator: Iterator[dict]
  eval_batches: Callable[[], Iterable[dict]]
  tokenizer: Any = None  # recorded in the run (prism_jax.tokenizer_record); None: not recorded


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
          num_batches=cfg.train.eval_batches, **kwargs),
      tokenizer=bundle.tokenizer)


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


class _Profiler:
  """JAX profiler trace over the configured step range (off when profile_steps is 0)."""

  def __init__(self, cfg: ExperimentConfig, workdir: str):
    self.start = cfg.train.profile_start
    self.stop = self.start + cfg.train.profile_steps if cfg.train.profile_steps else -1
    self.directory = layout.path(workdir, layout.PROFILE)
    self.active = False

  def before_step(self, step: int):
    if step == self.start and self.stop > 0:
      jax.profiler.start_trace(self.directory)
      self.active = True
    elif step == self.stop and self.active:
      self.close()

  def close(self):
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


class _PreemptionFlag:
  """Set by SIGTERM (how TPU VMs and schedulers announce preemption) or a first Ctrl-C
  (SIGINT), single-process runs: the loop saves at the current step and stops. A second
  Ctrl-C raises KeyboardInterrupt at once (the last committed checkpoint stays).

  Multi-process runs leave both signals alone: SIGTERM goes to JAX's preemption service,
  whose sync point makes every process stop at the same step
  (`Checkpointer.reached_preemption`), and one process alone must not stop on a Ctrl-C.
  """

  def __init__(self):
    self.raised = False
    self.reason = "preempted"
    self._previous = {}

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
      if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not ignored
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle)
    return self

  def _handle(self, signum, frame):
    self.raised = True
    if signum == signal.SIGINT:
      self.reason = "interrupted"
      signal.signal(signal.SIGINT, self._previous[signal.SIGINT])  # the next one stops at once
      print("\ninterrupted: saving the current step (Ctrl-C again to stop without saving)",
            file=sys.stderr, flush=True)

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)


def train(cfg: ExperimentConfig, workdir: str, data: TrainData | None = None,
          mesh: jax.sharding.Mesh | None = None) -> dict:
  """Runs (or resumes) training to `cfg.train.steps`; returns the last metrics.

  On SIGTERM, a first Ctrl-C (single-process runs) or JAX's preemption notice it saves a
  checkpoint at the current step, waits for it to be committed and returns with
  `preempted=True`.
  """
  with outputs.WorkdirLock(workdir, "train", create=True):
    distributed.check_shared_workdir(workdir)  # one checkpoint from every process
    return _train(cfg, workdir, data, mesh)


def _train(cfg: ExperimentConfig, workdir: str, data: TrainData | None, mesh) -> dict:
  checkpointer = Checkpointer(layout.path(workdir, layout.CHECKPOINTS), cfg.checkpoint,
                              settings=model_settings(cfg))
  try:
    # A config.json without any checkpoint is an attempt that never saved (a bad setting,
    # a kill before the first save): nothing to protect, so new settings replace it.
    resuming = checkpointer.latest_step() is not None or _set_aside_before(checkpointer)
    if resuming:
      cli.check_run_config(cfg, workdir)
    if checkpointer.latest_step() is not None:  # before anything is written
      checkpointer.check_settings(checkpointer.latest_step())
    cli.write_run_config(cfg, workdir)
    return _train_loop(cfg, workdir, data, checkpointer, mesh or sharding.make_mesh(cfg.mesh),
                       resuming)
  finally:
    checkpointer.close()


def _train_loop(cfg: ExperimentConfig, workdir: str, data: TrainData | None,
                checkpointer: Checkpointer, mesh: jax.sharding.Mesh, resuming: bool) -> dict:
  data = data or corpus_data(cfg)
  tokenizer_record.record_or_check(workdir, data.tokenizer, resuming, jax.process_index() == 0)
  steps = compile_steps(cfg, mesh)
  profiler = _Profiler(cfg, workdir)
  is_main = jax.process_index() == 0
  say = print if is_main else (lambda *a, **k: None)
  log = None
  try:
    state = _restore_or_init(steps, checkpointer, data, say)
    start = int(jax.device_get(state.step))
    log = MetricsLog(workdir, resume_step=start)
    total = cfg.train.steps
    if start >= total:
      say(f"the run is at step {start}, at or past train.steps={total}: nothing to train "
          "(raise train.steps to go on)", flush=True)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    progress = tqdm(total=total, initial=start, desc=cfg.name, unit="step", dynamic_ncols=True,
                    disable=not (cfg.train.progress and is_main), file=sys.stdout)
    speed = _Throughput(start)
    last_train, last_val, previous = {}, {}, None

    def check_and_report(step, metrics, log_it):
      # Runs one step late, so fetching metrics never stalls the device.
      streak = int(jax.device_get(metrics["nonfinite/streak"]))
      if streak >= cfg.train.max_nonfinite_steps:
        checkpointer.wait()
        raise UserError(f"stopping at step {step}: {streak} steps in a row had a non-finite loss "
                        f"or gradient or update; last good checkpoint: step "
                        f"{checkpointer.latest_step()} in {checkpointer.directory}")
      if not log_it:
        return None
      metrics = {k: v for k, v in jax.device_get(metrics).items() if np.ndim(v) == 0}
      metrics["tokens_per_second"] = speed.update(step, tokens_per_step)
      log.write(step, metrics)
      progress.set_postfix(loss=f"{metrics['loss/cross_entropy']:.3f}",
                           tok_s=f"{metrics['tokens_per_second']:.0f}")
      return metrics

    with _PreemptionFlag() as preemption:
      for step in range(start + 1, total + 1):
        profiler.before_step(step)
        batch = to_global_batch(next(data.train_iterator), steps.batch_sharding)
        state, metrics = steps.train_step(state, batch)
        if previous is not None:
          last_train = check_and_report(*previous) or last_train
        previous = (step, metrics, step % cfg.train.log_every == 0 or step == total)
        progress.update(1)
        if step % cfg.train.eval_every == 0 or step == total:
          last_val = validation_metrics(steps, state.params, data.eval_batches())
          log.write(step, last_val)
          progress.write(f"step {step}: " +
                         ", ".join(f"{k}={v:.4g}" for k, v in last_val.items()))
        preempted = preemption.raised or checkpointer.reached_preemption(step)
        if step % cfg.checkpoint.every == 0 or step == total or preempted:
          checkpointer.save(step, state, data.train_iterator, force=True)
        if preempted:
          checkpointer.wait()
          progress.close()
          say(f"{preemption.reason}: saved step {step} in {checkpointer.directory}; run again "
              "to resume", flush=True)
          return {**last_train, **last_val, "step": step, "final_state": state,
                  "preempted": True}
      if previous is not None:
        last_train = check_and_report(*previous) or last_train
    progress.close()
    return {**last_train, **last_val, "step": int(jax.device_get(state.step)),
            "final_state": state, "preempted": False}
  finally:
    profiler.close()
    if log is not None:
      log.close()


def _restore_or_init(steps: CompiledSteps, checkpointer: Checkpointer, data: TrainData, say):
  """The newest checkpoint that restores; ones whose bytes cannot be decoded are reported
  and set aside. Starts from step 0 only when the workdir never had a checkpoint."""
  target = abstract_with_sharding(steps.abstract_state, steps.state_sharding)
  set_aside = []
  for step in sorted(checkpointer.all_steps(), reverse=True):
    try:
      state = checkpointer.restore(step, target, data.train_iterator)
    except (CheckpointMismatch, CheckpointUnreachable):
      raise  # another model's, or unreachable (permissions, I/O): stop, touch nothing
    except UserError as e:
      moved = checkpointer.set_aside(step)
      set_aside.append(moved)
      say(f"warning: skipping unreadable checkpoint step {step} ({e}); kept as {moved}",
          flush=True)
      continue
    say(f"resuming from step {step} in {checkpointer.directory}", flush=True)
    return state
  if set_aside or _set_aside_before(checkpointer):
    raise UserError(f"no checkpoint in {checkpointer.directory} could be restored (set aside: "
                    f"{', '.join(set_aside or ['earlier'])}); to start again from step 0, "
                    "move that folder away first")
  return steps.init()


def _set_aside_before(checkpointer: Checkpointer) -> bool:
  """True when an earlier start set checkpoints aside: the run is not new."""
  directory = checkpointer.directory
  return directory.exists() and any(".unreadable" in p.name for p in directory.iterdir())
