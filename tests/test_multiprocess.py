"""Two processes on localhost (jax.distributed + gloo) train like one with the same global batch."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import portpicker
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu", **extra)
  return env


def _start(out, steps, processes, **extra_env):
  port = portpicker.pick_unused_port()
  procs = []
  for pid in range(processes):
    env = _env(**extra_env) if processes == 1 else _env(
        JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(processes),
        JAX_PROCESS_ID=str(pid), **extra_env)
    procs.append(subprocess.Popen([sys.executable, "-m", "tests.multiprocess_worker", str(out),
                                   str(steps)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  return procs


def _finish(out, procs):
  outputs = [p.communicate(timeout=300) for p in procs]
  for p, (stdout, stderr) in zip(procs, outputs):
    assert p.returncode == 0, stderr[-3000:]
  return outputs[0][0], dict(np.load(pathlib.Path(out) / "params.npz"))


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  steps = 4
  # Both runs at once (own folders, own processes): the one-process run needs nothing from
  # the other, and the machine's cores are not left idle while one run waits on the other.
  two_procs = _start(tmp_path / "two", steps, processes=2)
  one_procs = _start(tmp_path / "one", steps, processes=1)
  out_two, two = _finish(tmp_path / "two", two_procs)
  out_one, one = _finish(tmp_path / "one", one_procs)
  assert "processes=2 devices=2" in out_two and "processes=1 devices=1" in out_one
  assert one.keys() == two.keys()
  worst = max(float(np.max(np.abs(one[k] - two[k]))) for k in one)
  print(f"largest parameter difference, 2 processes vs 1: {worst:.3g}")
  assert worst < 1e-5


@pytest.mark.slow
def test_a_workdir_the_processes_do_not_share_is_refused_before_any_work(tmp_path):
  procs = _start(tmp_path, 4, processes=2, PRISM_WORKER_OWN_WORKDIR="1")
  outputs = [p.communicate(timeout=300) for p in procs]
  for pid, (p, (_, stderr)) in enumerate(zip(procs, outputs)):
    assert p.returncode == 2, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last == (f"error: --workdir {tmp_path}/run_{pid} is not shared by the run's "
                    "processes: process(es) 1 of 2 cannot see what process 0 writes there "
                    "(each host's own disk?); give a bucket (gs://...) or a folder every host "
                    "mounts"), stderr[-3000:]
  # Nothing was trained or saved; the probe file and the lock are gone.
  assert list((tmp_path / "run_0").iterdir()) == []
  assert not (tmp_path / "run_1").exists()


def test_a_workdir_process_0_cannot_write_stops_every_process_in_one_line(tmp_path):
  """The others wait for process 0's probe; its failure must reach them, not hang them."""
  procs = _start(tmp_path, 4, processes=2, PRISM_WORKER_READ_ONLY_PROBE="1")
  outputs = [p.communicate(timeout=300) for p in procs]
  line = f"error: --workdir {tmp_path}/run: process 0 cannot write there"
  for pid, (p, (_, stderr)) in enumerate(zip(procs, outputs)):
    assert p.returncode == 2, stderr[-3000:]
    # process 0 knows why; the others learn only that it failed
    reason = " (Read-only file system)" if pid == 0 else ""
    assert stderr.strip().splitlines()[-1] == line + reason, stderr[-3000:]
  assert list((tmp_path / "run").iterdir()) == []  # nothing trained, the lock released
