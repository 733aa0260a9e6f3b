"""prism-jax: prototype language models (PRISM) and their dense baselines in JAX/Flax."""

from flax import nnx as _nnx

# Parameters carry logical axis names only; `step.compile_steps` places them on the mesh.
_nnx.use_eager_sharding(False)

__version__ = "0.1.0"
