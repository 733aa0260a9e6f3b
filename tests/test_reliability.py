"""Nothing lost: kill -9, SIGTERM, truncated checkpoints and poisoned batches."""

import pathlib
import random
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from prism_jax.config import apply_overrides
from prism_jax.errors import UserError
from prism_jax.metrics_log import read_jsonl
from prism_jax.train import train
from tests.synthetic import synthetic_data, tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _start_worker(workdir, steps, *overrides):
  return subprocess.Popen([sys.executable, "-m", "tests.train_worker", str(workdir), str(steps),
                           *overrides], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _wait_for_step(workdir, step, proc, timeout=180):
  """Blocks until the worker has logged `step` (so it is mid-run)."""
  path, deadline = pathlib.Path(workdir) / "metrics.jsonl", time.time() + timeout
  while time.time() < deadline:
    if path.exists() and any(r.get("step", 0) >= step for r in read_jsonl(path)):
      return
    if proc.poll() is not None:
      raise AssertionError(f"worker ended early: {proc.communicate()}")
    time.sleep(0.05)
  raise AssertionError(f"worker never reached step {step}")


def _losses(workdir):
  """Last logged training loss per step (a resumed step is logged again, identically)."""
  rows = [r for r in read_jsonl(pathlib.Path(workdir) / "metrics.jsonl") if "loss/total" in r]
  return {r["step"]: r["loss/total"] for r in rows}


def _final_params(workdir, steps):
  cfg = tiny_config(f"train.steps={steps}")
  return jax.device_get(train(cfg, str(workdir), synthetic_data(cfg))["final_state"].params)


@pytest.mark.slow
def test_kill_9_at_random_steps_then_resume_is_bit_exact(tmp_path):
  steps, kills = 24, 3
  straight = tmp_path / "straight"
  assert _start_worker(straight, steps).wait(timeout=300) == 0
  crashed = tmp_path / "crashed"
  rng = random.Random(0)
  for kill_step in sorted(rng.sample(range(3, steps - 2), kills)):
    proc = _start_worker(crashed, steps)
    _wait_for_step(crashed, kill_step, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert _start_worker(crashed, steps).wait(timeout=300) == 0
  assert _losses(crashed) == _losses(straight)
  # Restoring both at the final step: parameters equal bit for bit.
  diff = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                      _final_params(straight, steps), _final_params(crashed, steps))
  assert max(jax.tree.leaves(diff)) == 0.0


@pytest.mark.slow
def test_sigterm_saves_at_that_step_and_exits_0(tmp_path):
  proc = _start_worker(tmp_path, 400)
  _wait_for_step(tmp_path, 5, proc)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  assert "preempted" in out
  stopped_at = int(out.split()[-1])
  saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert saved[-1] == stopped_at
  # The next start resumes from exactly that step.
  proc = _start_worker(tmp_path, stopped_at + 2)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  assert f"resuming from step {stopped_at}" in out


def test_truncated_latest_checkpoint_is_skipped_not_deleted(tmp_path, capsys):
  cfg = tiny_config("train.steps=4", "checkpoint.every=2", "train.eval_every=100")
  straight = train(cfg, str(tmp_path / "straight"), synthetic_data(cfg))
  workdir = tmp_path / "run"
  train(cfg, str(workdir), synthetic_data(cfg))
  # Truncate every array file of the latest step, as a crash mid-copy would.
  for path in (workdir / "checkpoints" / "4" / "state").rglob("*"):
    if path.is_file() and path.stat().st_size > 0 and "metadata" not in path.name:
      path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
  resumed = train(cfg, str(workdir), synthetic_data(cfg))
  out = capsys.readouterr().out
  assert "skipping unreadable checkpoint step 4" in out
  assert "resuming from step 2" in out
  assert (workdir / "checkpoints" / "4.unreadable").is_dir()  # kept, not deleted
  chex.assert_trees_all_equal(jax.device_get(straight["final_state"].params),
                              jax.device_get(resumed["final_state"].params))


def test_a_nan_batch_is_skipped_and_counted(tmp_path):
  cfg = tiny_config("train.steps=4", "train.log_every=1", "train.eval_every=100")
  result = train(cfg, str(tmp_path), synthetic_data(cfg, nan_steps=frozenset({3})))
  assert int(result["final_state"].nonfinite_total) == 1
  assert int(result["final_state"].nonfinite_streak) == 0
  rows = {r["step"]: r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss/total" in r}
  assert rows[3]["nonfinite/total"] == 1 and np.isnan(rows[3]["loss/total"])
  assert all(np.isfinite(result["final_state"].params["prototype_head"]["keys"]).ravel())


def test_repeated_nans_stop_with_the_last_good_checkpoint_intact(tmp_path):
  cfg = tiny_config("train.steps=12", "train.log_every=1", "train.eval_every=100",
                    "checkpoint.every=2", "train.max_nonfinite_steps=3")
  with pytest.raises(UserError, match="3 steps in a row had a non-finite loss"):
    train(cfg, str(tmp_path), synthetic_data(cfg, nan_steps=frozenset(range(5, 13))))
  saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  good = tiny_config("train.steps=4")
  reference = train(good, str(tmp_path / "ref"), synthetic_data(good))
  # Whatever was saved after step 4 holds step 4's parameters (skipped steps change nothing).
  restored = train(apply_overrides(cfg, [f"train.steps={saved[-1]}"]), str(tmp_path),
                   synthetic_data(cfg))
  chex.assert_trees_all_equal(jax.device_get(restored["final_state"].params),
                              jax.device_get(reference["final_state"].params))
