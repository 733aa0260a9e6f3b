"""Train a PRISM or dense language model: `python -m prism_jax.main.train --exp prism_tiny`.

Starting again in the same workdir resumes from the latest complete checkpoint, data
iterator included (prism_jax/training.py).
"""

from __future__ import annotations

import time

from prism_jax import cli, layout
from prism_jax.errors import exit_on_user_error
from prism_jax.run import Run
from prism_jax.training import train


@exit_on_user_error
def main(argv=None):
  parser = cli.base_parser(__doc__.splitlines()[0])
  args = parser.parse_args(argv)
  opened = Run.create(args.exp, args.workdir, args.overrides)
  cfg, workdir = opened.cfg, opened.workdir
  started = time.perf_counter()
  with opened:
    result = train(cfg, workdir, mesh=opened.mesh)
  elapsed = time.perf_counter() - started
  if result["preempted"]:
    return
  shown = {k: v for k, v in result.items() if k.startswith("val/") or k == "step"}
  print(f"done in {elapsed:.0f}s: " + ", ".join(f"{k}={v:.4g}" for k, v in shown.items()))
  print(f"checkpoints: {layout.path(workdir, layout.CHECKPOINTS)}  "
        f"tensorboard: {layout.path(workdir, layout.TENSORBOARD)}")


if __name__ == "__main__":
  main()
