"""The post-hoc baselines made fair: EK-FAC over every trained matrix (scan_layers too) and
TRAK with an on-the-fly block projection (and an ensemble), against references written the
obvious way."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import experiments
from prism_jax.attribution import capture, common, ekfac, trak
from prism_jax.attribution.config import AttributionConfig
from prism_jax.config import apply_overrides
from prism_jax.models import lm

SMALL = ["model.vocab_size=32", "model.d_model=16", "model.d_ff=32", "model.num_layers=2",
         "model.num_heads=2", "prototypes.num_prototypes=8", "prototypes.top_k=2",
         "data.seq_len=8", "model.max_seq_len=8"]


def _setup(*extra, exp="prism_tiny", n=6):
  cfg = apply_overrides(experiments.get(exp), SMALL + list(extra))
  graphdef, params = lm.init(cfg, 0)
  rows = np.random.default_rng(0).integers(0, 32, (n, 9))
  query = common.Query(tuple(int(t) for t in rows[0, :5]), int(rows[1, 3]))
  return cfg, graphdef, params, common.from_rows(rows), query


# Compiled once per graphdef: op-by-op (eager) gradients of the model dispatch every primitive
# separately and took most of these tests' time.
_loss_grad = jax.jit(jax.grad(common.summed_loss, argnums=1), static_argnums=0)
_per_example_grads = jax.jit(common.per_example_grads, static_argnums=0)


def _base(name):
  return name.split("#")[0].split("[")[0]


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_ekfac_sites_cover_every_trained_matrix_and_rebuild_its_gradient(similarity):
  """Per-site gradients sum_t x_t delta_t^T, mapped back to each parameter, equal jax.grad
  for every matrix: projections, U, the keys (for cosine scores through their unit
  normalisation) and the tied embedding (lookup site + unembedding site)."""
  cfg, graphdef, params, train, _ = _setup(f"prototypes.similarity={similarity}")
  batch = train.batch(np.arange(train.num_examples))
  _, sites = jax.jit(capture.layer_io(ekfac.lm_loss(graphdef), ekfac.lm_target))(params, batch)
  grads = _loss_grad(graphdef, params, batch)
  flat = {capture.path_name(k): v for k, v in jax.tree_util.tree_flatten_with_path(grads)[0]}
  matrices = {n for n, g in flat.items() if g.ndim >= 2}
  assert {_base(s) for s in sites} == matrices
  rebuilt = {}
  for name, (x, d) in sites.items():
    g = np.asarray(x, np.float64).T @ np.asarray(d, np.float64)  # [in, out]
    target = flat[_base(name)]
    if name in ("backbone/embedding#1", "prototype_head/keys"):  # weight is [out, in]
      g = g.T
    rebuilt[_base(name)] = rebuilt.get(_base(name), 0) + g.reshape(target.shape)
  if cfg.prototypes.similarity == "cosine":  # the site reads the unit keys
    keys = params["prototype_head"]["keys"]
    unit = lambda k: k * jax.lax.rsqrt(jnp.sum(k * k, -1, keepdims=True) + 1e-12)
    rebuilt["prototype_head/keys"] = jax.vjp(unit, keys)[1](
        jnp.asarray(rebuilt["prototype_head/keys"], jnp.float32))[0]
  for name in matrices:
    np.testing.assert_allclose(rebuilt[name], flat[name], rtol=1e-3,
                               atol=1e-4 * float(np.abs(flat[name]).max()), err_msg=name)


def _stack_blocks(params, layers):
  """Unscanned params -> the scan_layers layout ([layers, ...] under backbone/blocks)."""
  blocks = [params["backbone"]["blocks"][i] for i in range(layers)]
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *blocks)
  return {**params, "backbone": {**params["backbone"], "blocks": stacked}}


def test_ekfac_with_scan_layers_equals_unrolled_layers():
  cfg, graphdef, params, train, query = _setup()
  scan_cfg = apply_overrides(cfg, ["model.scan_layers=true"])
  # The scanned model's structure only (equal to lm.init's graphdef): its parameters are the
  # plain model's, stacked; initialising them eagerly would compile every new shape's init.
  scan_graphdef, _ = lm.abstract_model(scan_cfg)
  scan_params = _stack_blocks(params, cfg.model.num_layers)
  attr = AttributionConfig(batch_size=3, ekfac_damping=0.1)
  got = {}
  for c, g, p in ((cfg, graphdef, params), (scan_cfg, scan_graphdef, scan_params)):
    factors = ekfac.lm_fit(g, p, train, attr)
    got[c.model.scan_layers] = (factors, ekfac.lm_score(g, p, factors, train, query,
                                                        cfg.data.seq_len, attr.batch_size))
  plain, scanned = got[False][0].layers, got[True][0].layers
  assert "backbone/blocks/attn/wq[1]" in scanned and "backbone/blocks/1/attn/wq" in plain
  assert len(plain) == len(scanned)
  np.testing.assert_allclose(scanned["backbone/blocks/mlp/w_up[1]"].lam,
                             plain["backbone/blocks/1/mlp/w_up"].lam, rtol=1e-3, atol=1e-7)
  np.testing.assert_allclose(got[True][1], got[False][1], rtol=1e-3,
                             atol=1e-4 * np.abs(got[False][1]).max())


# ------------------------------------------------------------------------------------------
# TRAK


def _dense_projection(params, proj, seed):
  """R [P, dim] built the obvious way: every leaf's blocks, concatenated and trimmed."""
  parts = []
  for leaf, x in enumerate(jax.tree.leaves(params)):
    blocks = -(-x.size // proj.block_rows)
    r = np.concatenate([np.asarray(trak.block(seed, leaf, c, proj.block_rows, proj.dim))
                        for c in range(blocks)])
    parts.append(r[:x.size])
  return np.concatenate(parts).astype(np.float64)


def _flat_grads(graphdef, params, train):
  g = _per_example_grads(graphdef, params, train.batch(np.arange(train.num_examples)))
  return np.concatenate([np.asarray(x, np.float64).reshape(train.num_examples, -1)
                         for x in jax.tree.leaves(g)], axis=1)


def test_trak_equals_an_explicit_projection_and_inverse():
  cfg, graphdef, params, train, query = _setup()
  proj = trak.Projection(dim=4, seeds=(3,), block_rows=64)  # several blocks per leaf
  state = trak.prepare(graphdef, params, train, proj, damping=0.1, batch_size=4)
  r = _dense_projection(params, proj, 3)
  phi = _flat_grads(graphdef, params, train) @ r
  np.testing.assert_allclose(state.features[0], phi, rtol=1e-3, atol=1e-4 * np.abs(phi).max())
  gn = phi.T @ phi / len(phi)
  inverse = np.linalg.inv(gn + 0.1 * np.mean(np.diag(gn)) * np.eye(4))
  g_q = _loss_grad(graphdef, params, query.batch(8))
  phi_q = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(g_q)]) @ r
  expected = phi @ inverse @ phi_q
  got = trak.score(state, graphdef, params, proj, query, 8)
  np.testing.assert_allclose(got, expected, rtol=2e-3, atol=1e-4 * np.abs(expected).max())


def test_trak_never_materialises_params_by_dim():
  """No value in the traced feature computation is as large as [params, dim]/2."""
  cfg, graphdef, params, train, _ = _setup()
  proj = trak.Projection(dim=16, seeds=(0,), block_rows=64)
  example_features, _ = trak._fns(graphdef, proj)
  batch = train.batch(np.arange(4))
  jaxpr = jax.make_jaxpr(example_features)(params, batch)
  sizes = []

  def walk(j):
    for eqn in j.eqns:
      sizes.extend(int(np.prod(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, "shape"))
      for p in eqn.params.values():
        inner = getattr(p, "jaxpr", None)
        if inner is not None:
          walk(getattr(inner, "jaxpr", inner))
  walk(jaxpr.jaxpr)
  assert max(sizes) < lm.count_params(params) * proj.dim / 2


def test_trak_ensemble_averages_independent_projections():
  cfg, graphdef, params, train, query = _setup()
  scores = []
  # Seed 3 and block_rows=64 as in the test above: that member's compiled feature functions
  # (cached per graphdef and Projection) are reused; the seeds themselves are arbitrary.
  for seeds in ((3,), (4,), (3, 4)):
    proj = trak.Projection(dim=4, seeds=seeds, block_rows=64)
    state = trak.prepare(graphdef, params, train, proj, damping=0.1, batch_size=4)
    scores.append(trak.score(state, graphdef, params, proj, query, 8))
  np.testing.assert_allclose(scores[2], (scores[0] + scores[1]) / 2, rtol=1e-5, atol=1e-6)
  assert trak.projection(params, 8, 5, ensemble=3).seeds == (5, 6, 7)


def test_ekfac_runs_on_the_dense_twin_with_scan_layers():
  """(The PRISM head with scan_layers: test_ekfac_with_scan_layers_equals_unrolled_layers.)"""
  cfg, graphdef, params, train, query = _setup("model.scan_layers=true", exp="dense_tiny")
  attr = AttributionConfig(batch_size=3)
  factors = ekfac.lm_fit(graphdef, params, train, attr)
  assert any(n.startswith("backbone/embedding") for n in factors.layers)
  scores = ekfac.lm_score(graphdef, params, factors, train, query, 8, 3)
  assert scores.shape == (train.num_examples,) and np.all(np.isfinite(scores))


def test_ekfac_fit_examples_fits_on_the_first_examples_and_scores_them_all():
  """attr.ekfac_fit_examples=n: the factors of the first n examples; scoring still covers
  every example (the benchmark times queries with factors fitted on a sample)."""
  cfg, graphdef, params, train, query = _setup(exp="dense_tiny")
  n = 3
  sampled = ekfac.lm_fit(graphdef, params, train, AttributionConfig(batch_size=3,
                                                                      ekfac_fit_examples=n))
  first = ekfac.lm_fit(graphdef, params, train.subset(np.arange(n)),
                       AttributionConfig(batch_size=3))
  full = ekfac.lm_fit(graphdef, params, train, AttributionConfig(batch_size=3))
  name = next(iter(sampled.layers))
  np.testing.assert_allclose(sampled.layers[name].lam, first.layers[name].lam, rtol=1e-5)
  assert not np.allclose(sampled.layers[name].lam, full.layers[name].lam)
  scores = ekfac.lm_score(graphdef, params, sampled, train, query, 8, 3)
  assert scores.shape == (train.num_examples,) and np.all(np.isfinite(scores))
