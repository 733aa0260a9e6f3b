"""Nothing lost: kill -9, SIGTERM, truncated checkpoints and poisoned batches."""

import os
import pathlib
import re
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
from prism_jax.training import train
from tests.synthetic import synthetic_data, tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _start_worker(workdir, steps, *overrides, env=None, log=None):
  """The worker in its own process; `env` adds its test hooks (see tests/train_worker.py).

  With `log`, stdout and stderr go to that file (a held worker never blocks on a full pipe).
  """
  out = open(log, "w") if log else subprocess.PIPE
  try:
    return subprocess.Popen([sys.executable, "-m", "tests.train_worker", str(workdir),
                             str(steps), *overrides], cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=out, stderr=subprocess.STDOUT if log else subprocess.PIPE,
                            text=True)
  finally:
    if log:
      out.close()


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


def _listed_steps(workdir):
  """The steps Orbax lists (finished ones: a step folder is named by its number alone)."""
  return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir()
                if p.name.isdigit())


def _resumed_from(output):
  """The steps the trainer said it resumed from ("resuming from step N in ...")."""
  return [int(n) for n in re.findall(r"^resuming from step (\d+) in ", output, re.M)]


def _hold_then_signal(workdir, steps, hold, log, *overrides, signals=(signal.SIGKILL,),
                      timeout=300):
  """Starts the worker with a hold (`before_step:N` or `commit:N`), waits until it is held
  there, sends `signals` half a second apart and waits for it to end; returns (what the hold
  said, the worker's output, its return code)."""
  marker = pathlib.Path(str(log) + ".held")
  proc = _start_worker(workdir, steps, *overrides, log=log,
                       env={"PRISM_WORKER_HOLD": hold, "PRISM_WORKER_MARKER": str(marker)})
  deadline = time.time() + timeout
  try:
    while not marker.exists():
      if proc.poll() is not None:
        raise AssertionError(f"worker ended (rc {proc.returncode}) before its hold {hold}:\n"
                             + pathlib.Path(log).read_text())
      if time.time() > deadline:
        raise AssertionError(f"worker never reached its hold {hold}:\n"
                             + pathlib.Path(log).read_text())
      time.sleep(0.05)
    for i, signum in enumerate(signals):
      time.sleep(0.5 if i else 0)
      proc.send_signal(signum)
    proc.wait(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  return marker.read_text(), pathlib.Path(log).read_text(), proc.returncode


def _hold_then_kill_9(workdir, steps, hold, log, *overrides, timeout=300):
  """`_hold_then_signal` with SIGKILL; returns (what the hold said, the worker's output)."""
  said, out, returncode = _hold_then_signal(workdir, steps, hold, log, *overrides,
                                            timeout=timeout)
  assert returncode == -signal.SIGKILL
  return said, out


def _load_npz(path):
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


# Checkpoints every 3 steps, so most kills land between two and steps are recomputed; keep=2.
# No resume lands on a multiple of 8 (the synthetic data's epoch): there a dropped iterator
# position would replay the very same batches and go unseen.
KILL_CONFIG = ("checkpoint.every=3", "checkpoint.keep=2")
# (hold where the kill lands, step it must resume from, steps listed after the kill)
KILLS = [("before_step:8", None, [3, 6]),        # mid-run, steps 1..7 done
         ("commit:12", 6, [6, 9]),               # during step 12's async write
         ("before_step:20", 9, [15, 18])]        # 12 never listed: resumed from 9


@pytest.mark.slow
def test_kill_9_at_chosen_steps_and_mid_checkpoint_write_then_resume_is_bit_exact(tmp_path):
  steps = 24
  straight, crashed = tmp_path / "straight", tmp_path / "crashed"
  proc = _start_worker(straight, steps, *KILL_CONFIG, log=tmp_path / "straight.log",
                       env={"PRISM_WORKER_DUMP": str(tmp_path / "straight.npz")})
  # The straight run (its own workdir) goes on beside the crashed one, compared only at the
  # end. Once it has logged step 1 its compiled train step is in the session's compilation
  # cache, which the crashed run's starts then read instead of compiling it again.
  _wait_for_step(straight, 1, proc)
  for leg, (hold, resume_from, listed) in enumerate(KILLS):
    said, out = _hold_then_kill_9(crashed, steps, hold, tmp_path / f"leg{leg}.log", *KILL_CONFIG)
    # Each start resumed from the checkpoint expected (or started afresh) and got past it to
    # the step where it was killed: the hold fires at that step of the restored state, and
    # the checkpoints listed now are ones this start wrote after its resume step.
    assert _resumed_from(out) == ([] if resume_from is None else [resume_from]), out
    assert said.split()[:2] == hold.split(":"), said
    assert _listed_steps(crashed) == listed, out
    kind, step = hold.split(":")
    if kind == "commit":
      # Killed while Orbax wrote that step: its arrays lie in a temporary folder (written,
      # not yet renamed), and the step is not listed; the next start resumes from the last.
      tmp_dir = pathlib.Path(said.split()[2])
      assert tmp_dir.parent == crashed / "checkpoints" and tmp_dir.name.startswith(f"{step}."), said
      assert any(p.is_file() for p in (tmp_dir / "state").rglob("*")), said
      assert int(step) not in listed
  assert proc.wait(timeout=300) == 0, (tmp_path / "straight.log").read_text()
  proc = _start_worker(crashed, steps, *KILL_CONFIG, log=tmp_path / "last.log",
                       env={"PRISM_WORKER_DUMP": str(tmp_path / "crashed.npz")})
  assert proc.wait(timeout=300) == 0, (tmp_path / "last.log").read_text()
  out = (tmp_path / "last.log").read_text()
  assert _resumed_from(out) == [18] and f"finished {steps}" in out, out
  losses = _losses(crashed)
  assert sorted(losses) == list(range(1, steps + 1))
  assert losses == _losses(straight)
  # The final train state (parameters, optimizer state, counters) equal bit for bit.
  want, got = _load_npz(tmp_path / "straight.npz"), _load_npz(tmp_path / "crashed.npz")
  assert sorted(want) == sorted(got) and any("params" in k for k in want)
  different = [k for k in want if not np.array_equal(want[k], got[k])]
  assert not different, different


@pytest.mark.slow
@pytest.mark.parametrize("signum, said", [(signal.SIGTERM, "preempted"),
                                          (signal.SIGINT, "interrupted")])
def test_sigterm_or_ctrl_c_saves_at_that_step_and_exits_0(tmp_path, signum, said):
  proc = _start_worker(tmp_path, 400)
  _wait_for_step(tmp_path, 5, proc)
  proc.send_signal(signum)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  assert "preempted" in out  # the worker's own last line: "preempted STEP"
  stopped_at = int(out.split()[-1])
  assert f"{said}: saved step {stopped_at}" in out, out
  saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert saved[-1] == stopped_at
  # The next start resumes from exactly that step.
  proc = _start_worker(tmp_path, stopped_at + 2)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  assert f"resuming from step {stopped_at}" in out


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_in_one_line(tmp_path):
  # Held before step 5 with steps 1-4 committed: the first Ctrl-C asks for a save after the
  # step, the second lands while the step is still running and stops the run there.
  _, out, returncode = _hold_then_signal(tmp_path, 400, "before_step:5", tmp_path / "w.log",
                                         signals=(signal.SIGINT, signal.SIGINT))
  assert returncode == 130, out
  assert "Ctrl-C again to stop without saving" in out, out
  assert out.strip().splitlines()[-1] == "interrupted", out
  assert "Traceback" not in out, out
  assert _listed_steps(tmp_path)[-1] == 4
  proc = _start_worker(tmp_path, 6)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  assert _resumed_from(out) == [4], out


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
