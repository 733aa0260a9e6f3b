"""Runs any method for a query over one training set: the shared driver of the CLI, the
LDS study and the benchmark. Preparation (index/factors/projections) is separate from the
per-query call so that both can be timed."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Callable

import numpy as np

from prism_jax.attribution import common, ekfac, graddot, index as index_lib, influence
from prism_jax.attribution import indexing, prototype, single_pass, trak
from prism_jax.attribution.config import AttributionConfig
from prism_jax.errors import UserError

# The first is the default: one forward pass + an O(k T) index read, as faithful as
# `influence` (docs/attribution.md).
METHODS = ("single_pass", "prototype", "influence", "ekfac", "trak", "graddot")
PROTOTYPE_METHODS = ("single_pass", "prototype", "influence")
DEFAULT_METHOD = METHODS[0]


@dataclasses.dataclass
class Prepared:
  """A method ready to answer queries: `query(q) -> Scores`, and its stored bytes."""
  method: str
  query: Callable[[common.Query], prototype.Scores]
  stored_bytes: int


def _example_scores(scores: np.ndarray) -> prototype.Scores:
  return prototype.Scores.from_dense(scores)


def prepare(method: str, cfg, graphdef, params, train: common.TrainingSet,
            attr: AttributionConfig, *, index_dir: str | None = None, decode=None,
            build_index: bool = True) -> Prepared:
  """Builds (or opens) whatever `method` needs over `train`."""
  length = cfg.data.seq_len
  if method in PROTOTYPE_METHODS:
    if cfg.model.head != "prism":
      raise UserError(f"--method {method} needs a PRISM model; {cfg.name} has a dense head "
                      "(use ekfac, trak or graddot)")
    if index_dir is None:
      index_dir = os.path.join(tempfile.mkdtemp(prefix="prism_index_"), "index")
    # The values term and influence solve with each prototype's G_j.
    needs_curvature = method == "influence" or (method == "single_pass"
                                                and attr.single_pass_terms != "unembedding")
    if build_index:
      if method == "influence":  # its g_t [N, D] is stored only on request (small N)
        attr = dataclasses.replace(attr, index_influence=True)
      if needs_curvature and attr.curvature == "none":
        attr = dataclasses.replace(attr, curvature="blocks")
      indexing.build(cfg, graphdef, params, train, index_dir, attr,
                      decode=decode or index_lib.default_decode)
    index = index_lib.Index(index_dir)
    head = lambda q: prototype.query_head(graphdef, params, q, length)
    if needs_curvature:
      index.require_curvature()
    if method == "single_pass":
      matrices, settings = single_pass.HeadMatrices.of(params), single_pass.Settings.of(attr)
      return Prepared(method, lambda q: single_pass.score(index, head(q), matrices, settings),
                      index.method_bytes("single_pass"))
    if method == "prototype":
      return Prepared(method, lambda q: prototype.score(index, head(q)),
                      index.method_bytes("prototype"))
    index.require_influence()
    return Prepared(method, lambda q: influence.score(index, head(q), attr.damping),
                    index.method_bytes("influence"))
  if method == "graddot":
    return Prepared(method, lambda q: _example_scores(graddot.score(
        graphdef, params, train, q, length, attr.batch_size)), 0)
  if method == "trak":
    proj = trak.projection(params, attr.trak_projection_dim, attr.trak_seed, attr.trak_ensemble)
    state = trak.prepare(graphdef, params, train, proj, attr.trak_damping, attr.batch_size)
    return Prepared(method, lambda q: _example_scores(trak.score(
        state, graphdef, params, proj, q, length)), state.nbytes)
  if method == "ekfac":
    factors = ekfac.lm_fit(graphdef, params, train, attr)
    return Prepared(method, lambda q: _example_scores(ekfac.lm_score(
        graphdef, params, factors, train, q, length, attr.batch_size)), factors.nbytes)
  raise UserError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
