"""prism-jax: prototype language models (PRISM) and their dense baselines in JAX/Flax."""

import glob as _glob
import os as _os

# A machine with no accelerator device node can only run on CPU: saying so before jax starts
# keeps an installed TPU runtime (the tpu-plan extra, which compiles plans for TPU slices)
# from probing for chips and printing its warnings at every start. TPU VMs expose
# /dev/accel* (v4, v5p) or /dev/vfio/* (v5e, v6e); NVIDIA GPUs /dev/nvidia*.
if "JAX_PLATFORMS" not in _os.environ and not any(
    _glob.glob(p) for p in ("/dev/accel*", "/dev/vfio/*", "/dev/nvidia*")):
  _os.environ["JAX_PLATFORMS"] = "cpu"

from flax import nnx as _nnx  # noqa: E402  (after the platform choice)

# Parameters carry logical axis names only; `step.compile_steps` places them on the mesh.
_nnx.use_eager_sharding(False)

__version__ = "0.1.0"
