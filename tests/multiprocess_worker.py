"""One process of a local data-parallel run: `python -m tests.multiprocess_worker OUT STEPS`.

Reads JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID like the real entry
point, trains the tiny synthetic config on its slice of each global batch and (process 0)
saves the final parameters to OUT/params.npz. With PRISM_WORKER_OWN_WORKDIR=1 each process
trains in a folder of its own (OUT/run_PID), as hosts with a workdir on their own disks would.
With PRISM_WORKER_READ_ONLY_PROBE=1 process 0's write of the shared-folder probe fails as on a
read-only mount (the tests run as root, whom file modes do not stop).
"""

import errno
import os
import sys

import jax
import numpy as np

from etils import epath

from prism_jax import distributed
from prism_jax.errors import exit_on_user_error
from prism_jax.training import train
from tests.synthetic import synthetic_data, tiny_config


@exit_on_user_error
def main():
  out, steps = sys.argv[1], sys.argv[2]
  cfg = tiny_config(f"train.steps={steps}", "train.eval_every=1000", "checkpoint.every=1000")
  distributed.initialize(cfg.distributed)
  data = synthetic_data(cfg, process_index=jax.process_index(),
                        process_count=jax.process_count())
  if os.environ.get("PRISM_WORKER_READ_ONLY_PROBE") == "1" and jax.process_index() == 0:
    _fail_probe_writes()
  own = os.environ.get("PRISM_WORKER_OWN_WORKDIR") == "1"
  workdir = os.path.join(out, f"run_{jax.process_index()}" if own else "run")
  result = train(cfg, workdir, data)
  # Data parallel only: every process holds a full replica of the parameters.
  params = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)),
                        result["final_state"].params)
  if jax.process_index() == 0:
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    np.savez(os.path.join(out, "params.npz"), **flat)
    print(f"processes={jax.process_count()} devices={jax.device_count()} "
          f"loss={result['loss/total']:.6f}", flush=True)


def _fail_probe_writes():
  write_text = epath.Path.write_text

  def refuse(self, *args, **kwargs):
    if self.name.startswith(".shared_check_"):
      raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
    return write_text(self, *args, **kwargs)

  for cls in {type(epath.Path("/tmp")), epath.Path}:
    cls.write_text = refuse


if __name__ == "__main__":
  main()
