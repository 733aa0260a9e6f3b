"""A training process for the crash tests: `python -m tests.train_worker WORKDIR STEPS [k=v ...]`.

Trains the tiny synthetic-data config, checkpointing every step (unless overridden), exactly
like the real entry point (same `train` function), so tests can kill it and start it again.

Test hooks (environment variables, all optional; the library code is untouched):

- `PRISM_WORKER_HOLD=before_step:N`: when step N is about to run (steps 1..N-1 done), wait
  until every pending checkpoint save is committed, then hold (sleep). The committed
  checkpoints are then exactly the multiples of `checkpoint.every` below N (as many as
  `checkpoint.keep` allows): a kill -9 lands at a known place.
- `PRISM_WORKER_HOLD=commit:N`: hold Orbax's background thread while step N's async save is
  in flight, after its files are written into the temporary folder and before the rename that
  commits them (`async_checkpointer._on_commit_callback`). The main thread carries on until
  it waits for that save. A kill -9 then hits a half-written checkpoint.
- `PRISM_WORKER_MARKER=PATH`: where the hold is announced (a file written when it starts;
  the test waits for it, then kills).
- `PRISM_WORKER_DUMP=PATH`: on a normal finish, the final train state (step, parameters,
  optimizer state, non-finite counters) as an .npz, leaf path -> array.
"""

import dataclasses
import os
import signal
import sys
import time

HOLD_ENV, MARKER_ENV, DUMP_ENV = "PRISM_WORKER_HOLD", "PRISM_WORKER_MARKER", "PRISM_WORKER_DUMP"


def _announce_and_hold(text: str):
  """Writes the marker (atomically: the test never reads half of it), then sleeps forever."""
  marker = os.environ[MARKER_ENV]
  with open(marker + ".tmp", "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.rename(marker + ".tmp", marker)
  print(f"holding: {text}", flush=True)
  while True:
    time.sleep(3600)


def _install_hold(kind: str, step: int):
  if kind == "before_step":
    import jax

    import prism_jax.checkpoint
    import prism_jax.training

    checkpointers = []
    original_init = prism_jax.checkpoint.Checkpointer.__init__

    def recording_init(self, *args, **kwargs):
      original_init(self, *args, **kwargs)
      checkpointers.append(self)

    prism_jax.checkpoint.Checkpointer.__init__ = recording_init
    original_compile = prism_jax.training.compile_steps  # AttributeError: the trainer changed

    def compile_with_hold(*args, **kwargs):
      steps = original_compile(*args, **kwargs)
      step_fn = steps.train_step

      def train_step(state, batch):
        if int(jax.device_get(state.step)) + 1 == step:
          for checkpointer in checkpointers:
            checkpointer.wait()
          _announce_and_hold(f"before_step {step}")
        return step_fn(state, batch)

      return dataclasses.replace(steps, train_step=train_step)

    prism_jax.training.compile_steps = compile_with_hold
  elif kind == "commit":
    from orbax.checkpoint._src.checkpointers import async_checkpointer

    original_commit = async_checkpointer._on_commit_callback  # pinned orbax-checkpoint

    def commit_with_hold(tmpdir, *args, **kwargs):
      if tmpdir.get_final().name == str(step):
        _announce_and_hold(f"commit {step} {tmpdir.get()}")
      return original_commit(tmpdir, *args, **kwargs)

    async_checkpointer._on_commit_callback = commit_with_hold
  else:
    raise SystemExit(f"{HOLD_ENV}={kind}:{step}: the kind is before_step or commit")


def _dump(path: str, state):
  import jax
  import numpy as np

  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
  np.savez(path, **{jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves})


def main():
  # A shell's background job starts with SIGINT ignored and its children inherit that
  # (CI's may): take Ctrl-C as a terminal delivers it, as the real entry point would.
  signal.signal(signal.SIGINT, signal.default_int_handler)
  from prism_jax.errors import exit_on_user_error
  from prism_jax.training import train
  from tests.synthetic import synthetic_data, tiny_config

  @exit_on_user_error
  def run():
    workdir, steps, *overrides = sys.argv[1:]
    if os.environ.get(HOLD_ENV):
      kind, _, step = os.environ[HOLD_ENV].partition(":")
      _install_hold(kind, int(step))
    cfg = tiny_config(f"train.steps={steps}", "train.log_every=1", "train.eval_every=1000",
                      "checkpoint.every=1", "checkpoint.keep=2", *overrides)
    result = train(cfg, workdir, synthetic_data(cfg))
    if os.environ.get(DUMP_ENV) and not result["preempted"]:
      _dump(os.environ[DUMP_ENV], result["final_state"])
    print("finished" if not result["preempted"] else "preempted", result["step"], flush=True)

  run()


if __name__ == "__main__":
  main()
