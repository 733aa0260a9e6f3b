"""Joining a multi-process run before JAX touches any device."""

from __future__ import annotations

import os

import jax

from prism_jax.config import ConfigError, DistributedConfig
from prism_jax.errors import UserError


def _setting(value, env: str, empty):
  return value if value != empty else os.environ.get(env, empty)


def initialize(cfg: DistributedConfig) -> bool:
  """Calls `jax.distributed.initialize` when this run spans processes; True if it did."""
  if cfg.initialize == "never":
    return False
  address = _setting(cfg.coordinator_address, "JAX_COORDINATOR_ADDRESS", "")
  multi_host_tpu = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if cfg.initialize == "auto" and not (address or multi_host_tpu):
    return False
  kwargs = {"initialization_timeout": cfg.initialization_timeout_s}
  if address:
    num_processes = int(_setting(cfg.num_processes, "JAX_NUM_PROCESSES", 0) or 0)
    process_id = int(_setting(cfg.process_id, "JAX_PROCESS_ID", -1))
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ConfigError(f"coordinator {address} needs distributed.num_processes >= 1 and "
                        f"0 <= distributed.process_id < num_processes (got {num_processes}, "
                        f"{process_id}); set them or JAX_NUM_PROCESSES/JAX_PROCESS_ID")
    kwargs.update(coordinator_address=address, num_processes=num_processes,
                  process_id=process_id)
  if cfg.cpu_collectives != "none":
    jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
  try:
    jax.distributed.initialize(**kwargs)
  except (RuntimeError, ValueError) as e:  # unreachable coordinator, bad id, timeout
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise UserError(f"cannot join the distributed run (coordinator {address or 'auto'}, "
                    f"{cfg.initialization_timeout_s}s timeout): {first}") from None
  return True


def check_shared_workdir(workdir: str, flag: str = "--workdir") -> None:
  """Multi-process runs: every process must see what process 0 writes in `workdir`.

  All processes write one Orbax checkpoint (or one index) there; on each host's own disk
  (a TPU VM's local path, say) every host would hold a part of it. A one-line UserError on
  every process, before any work, naming the processes that cannot see it (`flag`: the
  option that named the folder). No-op on one process.
  """
  if jax.process_count() == 1:
    return
  import secrets

  import numpy as np
  from etils import epath
  from jax.experimental import multihost_utils

  token = multihost_utils.broadcast_one_to_all(
      np.frombuffer(secrets.token_bytes(16), np.uint8))
  text = bytes(np.asarray(token, np.uint8)).hex()
  probe = epath.Path(workdir) / f".shared_check_{text[:12]}"
  failure = ""
  if jax.process_index() == 0:
    try:
      probe.parent.mkdir(parents=True, exist_ok=True)
      probe.write_text(text)
    except OSError as e:  # every process must still reach the collectives below
      failure = e.strerror or str(e)
  # Process 0's failure, as bytes every process receives (the others would wait forever).
  failed = multihost_utils.broadcast_one_to_all(np.array(bool(failure)))
  if bool(failed):
    raise UserError(f"{flag} {workdir}: process 0 cannot write there"
                    + (f" ({failure})" if failure else ""))
  try:
    seen = probe.read_text() == text
  except OSError:
    seen = False
  seen_by = np.asarray(multihost_utils.process_allgather(np.array(seen))).reshape(-1)
  if jax.process_index() == 0:
    try:
      probe.unlink()
    except OSError:
      pass  # a probe left behind is harmless; the check has its answer
  blind = [int(i) for i in np.nonzero(~seen_by)[0]]
  if blind:
    listed = ", ".join(map(str, blind[:8])) + (" ..." if len(blind) > 8 else "")
    raise UserError(f"{flag} {workdir} is not shared by the run's processes: process(es) "
                    f"{listed} of {len(seen_by)} cannot see what process 0 writes there "
                    "(each host's own disk?); give a bucket (gs://...) or a folder every "
                    "host mounts")
