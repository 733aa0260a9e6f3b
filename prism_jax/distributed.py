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
