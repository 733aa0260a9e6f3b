"""Train N steps, stop, resume, train M more == train N+M uninterrupted (data included)."""

import dataclasses

import chex
import jax

from prism_jax.metrics_log import read_jsonl
from prism_jax.training import train
from tests.synthetic import synthetic_data, tiny_config


def _with_steps(cfg, steps):
  return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))


def _train_losses(workdir):
  rows = [r for r in read_jsonl(f"{workdir}/metrics.jsonl") if "loss/total" in r]
  return {r["step"]: r["loss/total"] for r in rows}


def test_resume_equals_uninterrupted(tmp_path, capsys):
  cfg = tiny_config("train.log_every=1", "train.eval_every=4", "checkpoint.every=4",
                    "checkpoint.keep=2")
  straight = train(_with_steps(cfg, 10), str(tmp_path / "straight"), synthetic_data(cfg))
  resumed_dir = str(tmp_path / "resumed")
  first = train(_with_steps(cfg, 6), resumed_dir, synthetic_data(cfg))
  assert first["step"] == 6
  capsys.readouterr()
  # A fresh process would rebuild the pipeline from scratch; so do we.
  resumed = train(_with_steps(cfg, 10), resumed_dir, synthetic_data(cfg))
  assert resumed["step"] == 10
  # It resumed (a run that silently started over would end with the same numbers).
  assert "resuming from step 6 in " in capsys.readouterr().out
  # Steps 7..10 saw the batches an uninterrupted run sees there only if the iterator's
  # position was restored with the state (6 is no multiple of the 8-batch synthetic epoch).
  chex.assert_trees_all_equal(jax.device_get(straight["final_state"].params),
                              jax.device_get(resumed["final_state"].params))
  chex.assert_trees_all_equal(jax.device_get(straight["final_state"].opt_state),
                              jax.device_get(resumed["final_state"].opt_state))
  assert _train_losses(resumed_dir) == _train_losses(str(tmp_path / "straight"))
  assert straight["val/loss"] == resumed["val/loss"]
  # keep=2: only the newest two checkpoints remain.
  steps = sorted(int(p.name) for p in (tmp_path / "resumed" / "checkpoints").iterdir()
                 if p.name.isdigit())
  assert steps == [8, 10]


def test_tensorboard_events_are_written(tmp_path):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  cfg = tiny_config("train.log_every=1", "train.eval_every=2", "checkpoint.every=2")
  train(_with_steps(cfg, 2), str(tmp_path), synthetic_data(cfg))
  events = EventAccumulator(str(tmp_path / "tensorboard"))
  events.Reload()
  tags = events.Tags()["scalars"]
  for tag in ["loss/cross_entropy", "loss/cluster", "loss/evidence", "loss/diversity",
              "loss/balance", "val/loss", "val/dead_prototypes", "tokens_per_second"]:
    assert tag in tags, tag
