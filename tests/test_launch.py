"""launch/: dry runs print the exact commands; bad arguments fail in one line with exit 2."""

import os
import pathlib
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TPU = str(ROOT / "launch" / "tpu.py")
GPU = str(ROOT / "launch" / "gpu_cluster.py")
POD = ["--name", "prism-pod", "--zone", "us-east5-a"]


def run(script, *argv, env=None):
  return subprocess.run([sys.executable, script, *argv], capture_output=True, text=True,
                        cwd=ROOT, env=env, timeout=120)


def dry(script, *argv) -> list[str]:
  proc = run(script, *argv, "--dry-run")
  assert proc.returncode == 0, proc.stderr
  return proc.stdout.strip().splitlines()


def test_tpu_create_v5p_64():
  assert dry(TPU, "create", *POD, "--accelerator-type", "v5p-64", "--project", "my-proj") == [
      "gcloud compute tpus tpu-vm create prism-pod --zone=us-east5-a --project=my-proj "
      "--accelerator-type=v5p-64 --version=v2-alpha-tpuv5"]


def test_tpu_create_queued_resource():
  assert dry(TPU, "create", *POD, "--accelerator-type", "v5p-64", "--queued",
             "--runtime-version", "v2-alpha-tpuv5") == [
      "gcloud compute tpus queued-resources create prism-pod --node-id=prism-pod "
      "--zone=us-east5-a --accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5"]


def test_tpu_train_runs_make_train_on_all_workers():
  lines = dry(TPU, "train", *POD, "--exp", "prism_1b", "--args", "train.steps=10 mesh.data=2",
              "--workdir", "gs://b/runs/p")
  assert lines == [
      "gcloud compute tpus tpu-vm ssh prism-pod --zone=us-east5-a --worker=all "
      "'--command=cd prism-jax && mkdir -p logs && setsid nohup make train EXP=prism_1b "
      "'\"'\"'ARGS=train.steps=10 mesh.data=2'\"'\"' WORKDIR=gs://b/runs/p "
      "> logs/train-$(hostname).log 2>&1 < /dev/null & echo $! > logs/train.pid'"]
  argv = shlex.split(lines[0])
  assert argv[-1].startswith("--command=cd prism-jax && ")  # one argument for gcloud


def test_tpu_train_keeps_the_run_on_the_vm_only_when_asked():
  line, = dry(TPU, "train", *POD, "--exp", "prism_tiny", "--workdir", "runs/p",
              "--workdir-on-vm")
  assert "make train EXP=prism_tiny WORKDIR=runs/p >" in line


def test_make_launch_dry_run_prints_a_bucket_workdir():
  proc = subprocess.run(["make", "-s", "launch-dry-run", "EXP=prism_1b", "TOPOLOGY=v5p-64",
                         "ZONE=us-east5-a", "BUCKET_WORKDIR=gs://mine/runs/x",
                         f"PY={sys.executable}"], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert "WORKDIR=gs://mine/runs/x" in proc.stdout.splitlines()[-1]


def test_tpu_setup_copy_and_clone():
  copy = dry(TPU, "setup", *POD)
  assert copy[0].endswith("--worker=all '--command=mkdir -p prism-jax'")
  scp = shlex.split(copy[1])
  assert scp[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse",
                     str(ROOT / "Makefile")]
  assert "prism-pod:prism-jax/" in scp and scp[-1] == "--worker=all"
  assert "make setup PYTHON=python3.11" in copy[2] and "jax[tpu]==0.10.2" in copy[2]
  clone = dry(TPU, "setup", *POD, "--repo", "https://example.com/prism-jax.git")
  assert "git clone https://example.com/prism-jax.git prism-jax" in clone[0]
  assert len(clone) == 2 and "make setup" in clone[1]


def test_tpu_logs_stop_delete():
  assert dry(TPU, "logs", *POD) == [
      "gcloud compute tpus tpu-vm ssh prism-pod --zone=us-east5-a --worker=0 "
      "'--command=tail -n 200 -F prism-jax/logs/train-*.log'"]
  stop, = dry(TPU, "stop", *POD)
  assert "--worker=all" in stop and "kill -TERM -- -$(cat logs/train.pid)" in stop
  assert dry(TPU, "delete", *POD) == [
      "gcloud compute tpus tpu-vm delete prism-pod --zone=us-east5-a --quiet"]
  assert dry(TPU, "delete", *POD, "--queued") == [
      "gcloud compute tpus queued-resources delete prism-pod --zone=us-east5-a --force --quiet"]


def test_setup_py_pins_the_jax_version_the_scripts_install():
  from launch import common
  assert f'"jax=={common.JAX_VERSION}"' in (ROOT / "setup.py").read_text()


def test_gpu_cluster_train_sets_distributed_env():
  lines = dry(GPU, "--hosts", "gpu1,ubuntu@10.0.0.2", "--gpus-per-host", "4", "--exp",
              "prism_1b", "--coordinator-port", "5555")
  assert len(lines) == 2
  for i, (line, host) in enumerate(zip(lines, ["gpu1", "ubuntu@10.0.0.2"])):
    argv = shlex.split(line)
    assert argv[:4] == ["ssh", "-o", "BatchMode=yes", host] and len(argv) == 5
    assert argv[4] == (
        "cd prism-jax && mkdir -p logs && setsid nohup env JAX_COORDINATOR_ADDRESS=gpu1:5555 "
        f"JAX_NUM_PROCESSES=2 JAX_PROCESS_ID={i} CUDA_VISIBLE_DEVICES=0,1,2,3 make train "
        f"EXP=prism_1b > logs/train-{i}.log 2>&1 < /dev/null & echo $! > logs/train.pid")


def test_gpu_cluster_other_actions():
  hosts = ["--hosts", "gpu1,gpu2"]
  setup = dry(GPU, "setup", *hosts)
  assert len(setup) == 6 and setup[1].startswith("scp -o BatchMode=yes -r ")
  assert "jax[cuda12]==0.10.2" in setup[2]
  assert dry(GPU, "logs", *hosts, "--process", "1") == [
      "ssh -o BatchMode=yes gpu2 'tail -n 200 -F prism-jax/logs/train-1.log'"]
  stop = dry(GPU, "stop", *hosts)
  assert [shlex.split(s)[3] for s in stop] == ["gpu1", "gpu2"]


@pytest.mark.parametrize("script, argv, message", [
    (TPU, ["create", "--name", "p", "--zone", "useast5", "--accelerator-type", "v5p-64"],
     "--zone 'useast5' is not a zone"),
    (TPU, ["create", *POD, "--accelerator-type", "v5p-63"], "unknown --accelerator-type"),
    (TPU, ["create", *POD, "--accelerator-type", "tpu9"], "unknown --accelerator-type"),
    (TPU, ["train", *POD, "--exp", "prism_2b"], "unknown experiment 'prism_2b'"),
    (TPU, ["train", *POD, "--exp", "prism_1b", "--args", "train.stepz=3"],
     "unknown config key 'train.stepz'"),
    (TPU, ["train", *POD], "--exp is required"),
    (TPU, ["train", *POD, "--exp", "prism_1b"],
     "without --workdir, the run goes on the TPU VM's own disk, which `delete` or a preemption"),
    (TPU, ["train", *POD, "--exp", "prism_1b", "--workdir", "runs/p"],
     "--workdir runs/p is on the TPU VM's own disk"),
    (TPU, ["create", "--zone", "us-east5-a", "--accelerator-type", "v5p-64"],
     "--name is required"),
    (TPU, ["create", "--name", "Bad_Name", "--zone", "us-east5-a"], "--name 'Bad_Name'"),
    (TPU, ["create", *POD], "create needs --accelerator-type"),
    (TPU, ["reboot", *POD], "invalid choice"),
    (TPU, ["setup", *POD, "--repo", "x", "--copy"], "not allowed with"),
    (GPU, ["--exp", "prism_1b"], "--hosts is required"),
    (GPU, ["--hosts", "gpu1", "--exp", "nope"], "unknown experiment 'nope'"),
    (GPU, ["--hosts", "gpu1,gpu1", "--exp", "prism_1b"], "lists a host twice"),
    (GPU, ["--hosts", "gpu1;reboot", "--exp", "prism_1b"], "is not a hostname"),
    (GPU, ["--hosts", "gpu1", "--exp", "prism_1b", "--coordinator-port", "70000"],
     "not a TCP port"),
])
def test_bad_arguments_fail_in_one_line(script, argv, message):
  proc = run(script, *argv, "--dry-run")
  assert proc.returncode == 2, proc
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
  assert proc.stdout == ""


def test_real_run_stops_at_first_failure(tmp_path):
  # A fake gcloud that records its calls and fails on `scp`.
  calls = tmp_path / "calls"
  fake = tmp_path / "gcloud"
  fake.write_text(f"#!/bin/sh\necho \"$*\" >> {calls}\n"
                  "case \"$*\" in *scp*) exit 3;; esac\nexit 0\n")
  fake.chmod(0o755)
  env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
  proc = run(TPU, "setup", *POD, env=env)
  assert proc.returncode == 1
  assert "error: step 2/3 failed with exit code 3: gcloud compute tpus tpu-vm scp" in proc.stderr
  recorded = calls.read_text().splitlines()
  assert len(recorded) == 2 and "scp" in recorded[1]  # the install step never ran


def test_missing_gcloud_is_a_clear_error(tmp_path):
  env = dict(os.environ, PATH=str(tmp_path))
  proc = run(TPU, "delete", *POD, env=env)
  assert proc.returncode == 2
  assert proc.stderr.strip().endswith("gcloud not found on PATH (use --dry-run to see the "
                                      "commands)")


@pytest.mark.parametrize("target", ["train", "eval", "index", "attribute", "explore"])
def test_make_targets_keep_a_workdir_with_spaces_whole(target):
  """`make train WORKDIR="my runs/a"` passes one --workdir, not a stray override `runs/a`."""
  printed = subprocess.run(["make", "-n", "-C", str(ROOT), target, "WORKDIR=/tmp/my runs/a"],
                           capture_output=True, text=True, check=True).stdout
  line, = [l for l in printed.splitlines() if "--workdir" in l]
  argv = shlex.split(line)
  assert argv[argv.index("--workdir") + 1] == "/tmp/my runs/a"
