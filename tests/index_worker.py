"""One process of a multi-process index build: `python -m tests.index_worker OUT`.

Joins jax.distributed like the real entry point (JAX_COORDINATOR_ADDRESS, ...), lays the
tiny model's parameters out on the global mesh and indexes its share of a fixed corpus
into OUT/index (every process writes its own folder; process 0 finishes the index). With
PRISM_WORKER_OWN_INDEX=1 each process is given OUT/index_PID, as hosts writing to their own
disks would be.
"""

import dataclasses
import os
import sys

import jax
import numpy as np

from prism_jax import distributed, sharding
from prism_jax.attribution import indexing
from prism_jax.attribution.config import AttributionConfig
from prism_jax.config import MeshConfig
from prism_jax.errors import exit_on_user_error
from prism_jax.models import lm
from tests.test_single_pass import SMALL, _corpus
from tests.synthetic import tiny_config


@exit_on_user_error
def main():
  out = sys.argv[1]
  cfg = tiny_config(*SMALL)
  distributed.initialize(cfg.distributed)
  cfg = dataclasses.replace(cfg, mesh=MeshConfig(data=-1, fsdp=1, model=1))
  mesh = sharding.make_mesh(cfg.mesh)
  _, params = lm.init(cfg, 0)
  corpus = _corpus([5, 9, 20, 2, 1, 17, 30, 12, 25], cfg.model.vocab_size)
  attr = AttributionConfig(batch_size=2, shard_prototypes=3, neighbourhood_size=4,
                           index_part_batches=2, postings=0, softmax_top=32,
                           index_dtype="float32", index_keep_build_fields=True,
                           curvature="blocks")
  with jax.set_mesh(mesh), sharding.use_rules(cfg.mesh.rules):
    specs = sharding.param_specs(lm.abstract_model(cfg)[1], cfg.mesh.rules)
    placed = jax.tree.map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: np.asarray(x)[i]),
        params, sharding.named(mesh, specs))
    graphdef, _ = lm.abstract_model(cfg)
    own = os.environ.get("PRISM_WORKER_OWN_INDEX") == "1"
    folder = f"{out}/index_{jax.process_index()}" if own else f"{out}/index"
    manifest = indexing.build(cfg, graphdef, placed, corpus, folder, attr, mesh=mesh)
  print(f"processes={jax.process_count()} tokens={manifest['num_tokens']}", flush=True)


if __name__ == "__main__":
  main()
