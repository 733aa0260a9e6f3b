"""A training process for the crash tests: `python -m tests.train_worker WORKDIR STEPS [k=v ...]`.

Trains the tiny synthetic-data config, checkpointing every step, exactly like the real
entry point (same `train` function), so tests can kill it and start it again.
"""

import sys

from prism_jax.errors import exit_on_user_error
from prism_jax.train import train
from tests.synthetic import synthetic_data, tiny_config


@exit_on_user_error
def main():
  workdir, steps, *overrides = sys.argv[1:]
  cfg = tiny_config(f"train.steps={steps}", "train.log_every=1", "train.eval_every=1000",
                    "checkpoint.every=1", "checkpoint.keep=2", *overrides)
  result = train(cfg, workdir, synthetic_data(cfg))
  print("finished" if not result["preempted"] else "preempted", result["step"], flush=True)


if __name__ == "__main__":
  main()
