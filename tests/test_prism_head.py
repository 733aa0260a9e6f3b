"""The prototype head: exact decomposition, sparsity, reference numerics, sharded top-k."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prism_jax import sharding
from prism_jax.config import MeshConfig, PrototypeConfig
from prism_jax.models import lm, prism_head
from tests.synthetic import random_batch, tiny_config


def _forward(cfg, seed=0):
  graphdef, params = lm.init(cfg, seed)
  batch = random_batch(cfg, seed)
  return graphdef, params, batch, lm.forward(graphdef, params, batch)


# Head variants of issue #13: each must keep sum_j c_j(y) == logit(y).
VARIANTS = {
    "keys_0.02": ["prototypes.key_init_std=0.02"],
    "unit_keys": ["prototypes.key_init_std=0.0884", "prototypes.key_renorm=true"],
    "selection_bias": ["prototypes.selection_bias_rate=0.01"],
    "thresholds": ["prototypes.thresholds=true"],
    "revival": ["prototypes.revive_after=10"],
    "base_prototype": ["prototypes.base_prototype=true", "prototypes.selection_bias_rate=0.01"],
    "dot": ["prototypes.similarity=dot", "prototypes.key_init_std=0.02"],
    "whitened": ["prototypes.similarity=dot", "prototypes.key_init_std=0.02",
                 "prototypes.whiten_rate=0.1"],
    "straight_through": ["prototypes.similarity=dot", "prototypes.key_init_std=0.02",
                         "prototypes.straight_through=1.0"],
}


def _perturb_head_state(params):
  """Non-zero bias and thresholds, as after training, so they take part in the test."""
  head = dict(params["prototype_head"])
  m = head["keys"].shape[0]
  rng = np.random.default_rng(7)
  for name in ("selection_bias", "thresholds"):
    if name in head:
      head[name] = jnp.asarray(rng.normal(scale=0.3, size=(m,)), jnp.float32)
  if "whitening" in head:  # running statistics away from (0, I)
    d = head["keys"].shape[1]
    head["hidden_mean"] = jnp.asarray(rng.normal(size=(d,)), jnp.float32)
    head["whitening"] = jnp.asarray(np.eye(d) + rng.normal(scale=0.2, size=(d, d)), jnp.float32)
  return {**params, "prototype_head": head}


@pytest.mark.parametrize("similarity, variant",
                         [("cosine", None), ("neg_sq_distance", None)]
                         + [("cosine", v) for v in VARIANTS])
def test_contributions_sum_to_every_logit(similarity, variant):
  cfg = tiny_config(f"prototypes.similarity={similarity}", *VARIANTS.get(variant, []))
  graphdef, params = lm.init(cfg, 0)
  params = _perturb_head_state(params)
  out = lm.forward(graphdef, params, random_batch(cfg, 0))
  protos = out.prototypes
  contrib_BxLxkxV = prism_head.contributions_all_tokens(
      protos.top_values, protos.top_indices, params["prototype_head"]["values"],
      lm.unembedding(params))
  chex.assert_shape(contrib_BxLxkxV, (8, 16, cfg.prototypes.top_k, cfg.model.vocab_size))
  np.testing.assert_allclose(contrib_BxLxkxV.sum(axis=2), out.logits, rtol=1e-5, atol=1e-5)


def test_contributions_for_chosen_tokens_match_logits():
  cfg = tiny_config()
  _, params, batch, out = _forward(cfg)
  p = out.prototypes
  c = prism_head.prototype_contributions(p.top_values, p.top_indices,
                                         params["prototype_head"]["values"],
                                         lm.unembedding(params), batch["targets"])
  target_logits = jnp.take_along_axis(out.logits, batch["targets"][..., None], -1)[..., 0]
  np.testing.assert_allclose(c.sum(-1), target_logits, rtol=1e-5, atol=1e-5)


def test_activations_non_negative_and_at_most_k():
  cfg = tiny_config()
  _, _, _, out = _forward(cfg)
  a = out.prototypes.activations
  chex.assert_shape(a, (8, 16, cfg.prototypes.num_prototypes))
  assert float(a.min()) >= 0.0
  assert int((a > 0).sum(-1).max()) <= cfg.prototypes.top_k
  # The sparse view agrees with the dense one.
  gathered = jnp.take_along_axis(a, out.prototypes.top_indices, -1)
  np.testing.assert_array_equal(gathered, out.prototypes.top_values)


def test_head_matches_reference_written_the_obvious_way():
  rng = np.random.default_rng(0)
  b, l, d, m, v, k = 2, 3, 8, 10, 12, 3
  h, keys, values, emb = (rng.normal(size=s).astype(np.float32)
                          for s in [(b, l, d), (m, d), (m, d), (v, d)])
  cfg = PrototypeConfig(num_prototypes=m, top_k=k, init_temperature=0.5)
  logits, out = prism_head.prototype_logits(h, keys, values, np.log(np.float32(0.5)), emb, cfg)
  expected = np.zeros((b, l, v), np.float32)
  for i in range(b):
    for t in range(l):
      sims = [h[i, t] @ keys[j] / np.linalg.norm(h[i, t]) / np.linalg.norm(keys[j]) / 0.5
              for j in range(m)]
      chosen = np.argsort(sims)[::-1][:k]
      mixed = sum(max(sims[j], 0.0) * values[j] for j in chosen)
      expected[i, t] = emb @ mixed
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


def test_selection_bias_changes_the_choice_not_the_weights():
  rng = np.random.default_rng(3)
  scores = jnp.asarray(rng.normal(size=(2, 5, 12)).astype(np.float32))
  bias = jnp.zeros((12,)).at[jnp.array([1, 4])].set(100.0)  # force 1 and 4 into every top-k
  dense, values, ids = prism_head.sparse_top_k(scores, 3, bias)
  assert all({1, 4} <= set(row) for row in np.asarray(ids).reshape(-1, 3).tolist())
  # The weights are relu of the unbiased scores of the chosen ids, sorted descending.
  np.testing.assert_array_equal(values, jax.nn.relu(jnp.take_along_axis(scores, ids, -1)))
  assert bool(jnp.all(values[..., :-1] >= values[..., 1:]))
  np.testing.assert_array_equal(jnp.take_along_axis(dense, ids, -1), values)
  assert int((dense > 0).sum(-1).max()) <= 3
  # A zero bias selects exactly as no bias does.
  for a, b in zip(prism_head.sparse_top_k(scores, 3, jnp.zeros((12,))),
                  prism_head.sparse_top_k(scores, 3)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mesh_shape", [(1, 1, 8), (2, 1, 4)])
def test_sharded_selection_bias_equals_unsharded(mesh_shape):
  rng = np.random.default_rng(5)
  scores = jnp.asarray(rng.normal(size=(8, 6, 64)).astype(np.float32))
  bias = jnp.asarray(rng.normal(scale=0.5, size=(64,)).astype(np.float32))
  ref = prism_head.sparse_top_k(scores, 5, bias)
  cfg = MeshConfig(data=mesh_shape[0], fsdp=mesh_shape[1], model=mesh_shape[2])
  mesh = sharding.make_mesh(cfg)
  with jax.set_mesh(mesh), sharding.use_rules(cfg.rules):
    spec = sharding.logical_to_spec(("batch", "length", "prototypes"))
    s = jax.device_put(scores, jax.sharding.NamedSharding(mesh, spec))
    got = jax.jit(lambda s, b: prism_head.sparse_top_k(s, 5, b))(s, bias)
  for a, b in zip(ref, got):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_base_prototype_is_always_on_with_weight_one():
  cfg = tiny_config("prototypes.base_prototype=true")
  _, params, batch, out = _forward(cfg)
  p = out.prototypes
  np.testing.assert_array_equal(p.activations[..., 0], 1.0)
  assert bool(jnp.all(jnp.any(p.top_indices == 0, -1)))
  assert int((p.activations > 0).sum(-1).max()) <= cfg.prototypes.top_k
  # Its slice is <U_0, E_y>, the same at every position.
  c = prism_head.prototype_contributions(p.top_values, p.top_indices,
                                         params["prototype_head"]["values"],
                                         lm.unembedding(params), batch["targets"])
  base = jnp.sum(jnp.where(p.top_indices == 0, c, 0.0), -1)
  e_y = lm.unembedding(params)[batch["targets"]]
  np.testing.assert_allclose(base, e_y @ params["prototype_head"]["values"][0], rtol=1e-5,
                             atol=1e-6)


def test_thresholds_enter_inside_the_relu():
  rng = np.random.default_rng(0)
  h, keys, values, emb = (rng.normal(size=s).astype(np.float32)
                          for s in [(1, 2, 8), (10, 8), (10, 8), (12, 8)])
  theta = rng.normal(scale=0.2, size=(10,)).astype(np.float32)
  cfg = PrototypeConfig(num_prototypes=10, top_k=3, init_temperature=0.5, thresholds=True)
  logits, out = prism_head.prototype_logits(h, keys, values, np.log(np.float32(0.5)), emb, cfg,
                                            thresholds_M=theta)
  for t in range(2):
    cos = keys @ h[0, t] / np.linalg.norm(keys, axis=1) / np.linalg.norm(h[0, t])
    s = (cos - theta) / 0.5
    chosen = np.argsort(s)[::-1][:3]
    mixed = sum(max(s[j], 0.0) * values[j] for j in chosen)
    np.testing.assert_allclose(logits[0, t], emb @ mixed, rtol=1e-4, atol=1e-5)


def test_key_init_scale_and_renormalisation():
  d = 32
  for std, renorm in [(1.0, False), (0.02, False), (0.0884, True)]:
    cfg = tiny_config(f"prototypes.key_init_std={std}", f"prototypes.key_renorm={renorm}")
    keys = np.asarray(lm.init(cfg, 0)[1]["prototype_head"]["keys"])
    norms = np.linalg.norm(keys, axis=1)
    np.testing.assert_allclose(np.median(norms), std * np.sqrt(d), rtol=0.2)
    if renorm:
      np.testing.assert_allclose(norms, std * np.sqrt(d), rtol=1e-5)


def test_tied_init_starts_the_keys_as_the_rescaled_values_and_leaves_the_default_draw():
  default = lm.init(tiny_config("prototypes.key_init_std=0.05"), 0)[1]["prototype_head"]
  tied = lm.init(tiny_config("prototypes.key_init_std=0.05", "prototypes.tie_init=true"),
                 0)[1]["prototype_head"]
  values = np.asarray(tied["values"])
  np.testing.assert_array_equal(values, np.asarray(default["values"]))
  np.testing.assert_allclose(np.asarray(tied["keys"]), values * (0.05 / 0.02), rtol=1e-6)
  assert not np.allclose(np.asarray(default["keys"]), np.asarray(tied["keys"]))


def test_suppressed_prototypes_are_never_active():
  cfg = tiny_config()
  graphdef, params = lm.init(cfg, 0)
  batch = random_batch(cfg)
  base = lm.forward(graphdef, params, batch).prototypes
  popular = int(np.bincount(np.asarray(base.top_indices).ravel()).argmax())
  suppressed = jnp.zeros((cfg.prototypes.num_prototypes,), bool).at[popular].set(True)
  out = lm.forward(graphdef, params, batch, suppressed_M=suppressed).prototypes
  assert float(out.activations[..., popular].max()) == 0.0
  assert int((out.activations > 0).sum(-1).max()) <= cfg.prototypes.top_k
  untouched = ~(base.top_indices == popular).any(-1)
  np.testing.assert_array_equal(np.asarray(out.top_indices)[untouched],
                                np.asarray(base.top_indices)[untouched])


def _reference_top_k(scores_BxLxM, k):
  """The obvious top-k: jax.lax.top_k on the whole bank, then relu.

  Tie rule (the contract of `prism_head.sparse_top_k`, sharded or not): among equal scores
  the lower prototype id wins and comes first, which is jax.lax.top_k's documented order
  ("if two elements are equal, the lower-index element appears first"). The sharded merge
  keeps it because each shard's candidates arrive sorted that way and the shards are
  all-gathered in id order, so the stable merge sees ties in ascending global id.
  """
  values, ids = jax.lax.top_k(jnp.asarray(scores_BxLxM), k)
  values = jax.nn.relu(values)
  dense = jnp.zeros(scores_BxLxM.shape, jnp.float32)
  dense = jax.vmap(jax.vmap(lambda row, i, v: row.at[i].set(v)))(dense, ids, values)
  return dense, values, ids


def _tied_scores(rng, shape):
  """Scores on a coarse grid (many equal values within and across shards), with rows that
  are entirely equal, rows of one value per shard block, negatives and -inf (suppressed)."""
  b, l, m = shape
  scores = rng.integers(-2, 4, size=shape).astype(np.float32) / 2.0
  scores[0, 0] = 1.0                                        # every prototype tied
  scores[0, 1] = np.repeat(np.arange(4, dtype=np.float32), m // 4)  # ties inside blocks
  scores[0, 2] = -1.0                                       # all tied and below zero
  scores[0, 3, ::3] = -np.inf                               # suppressed prototypes
  return scores


def _sharded_top_k(scores, k, mesh_shape):
  cfg = MeshConfig(data=mesh_shape[0], fsdp=mesh_shape[1], model=mesh_shape[2])
  mesh = sharding.make_mesh(cfg)
  with jax.set_mesh(mesh), sharding.use_rules(cfg.rules):
    spec = sharding.logical_to_spec(("batch", "length", "prototypes"))
    sharded_scores = jax.device_put(jnp.asarray(scores), jax.sharding.NamedSharding(mesh, spec))
    fn = jax.jit(lambda s: prism_head.sparse_top_k(s, k))
    jaxpr = str(jax.make_jaxpr(fn)(sharded_scores))
    got = fn(sharded_scores)
  return got, jaxpr, spec


# (M, k, mesh): more per shard than k; fewer per shard than k (M=16, k=8 on 4 shards holds
# 4 each; on 8 shards 2 each); the whole bank selected, on a mesh using every axis.
SHARDED_CASES = [(64, 5, (1, 1, 8)), (16, 8, (2, 1, 4)), (16, 8, (1, 1, 8)),
                 (16, 16, (2, 2, 2))]


@pytest.mark.parametrize("m, k, mesh_shape", SHARDED_CASES)
def test_sharded_top_k_equals_reference_top_k_with_ties(m, k, mesh_shape):
  scores = _tied_scores(np.random.default_rng(m * k), (8, 6, m))
  ref_dense, ref_values, ref_ids = _reference_top_k(scores, k)
  (dense, values, ids), jaxpr, spec = _sharded_top_k(scores, k, mesh_shape)
  # The per-shard path really ran: the bank is split and the candidates are all-gathered.
  assert spec[2] == "model" and mesh_shape[2] > 1
  assert "shard_map" in jaxpr and "all_gather" in jaxpr
  np.testing.assert_array_equal(np.asarray(ids), np.asarray(ref_ids))  # which ids win ties
  np.testing.assert_array_equal(np.asarray(values), np.asarray(ref_values))
  np.testing.assert_array_equal(np.asarray(dense), np.asarray(ref_dense))
  # ... and the unsharded path agrees with both.
  for a, b in zip(prism_head.sparse_top_k(jnp.asarray(scores), k), (ref_dense, ref_values,
                                                                     ref_ids)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tie_rule_lower_id_wins():
  """Equal scores in different shards: the lowest ids are selected, in ascending order."""
  scores = np.zeros((8, 1, 16), np.float32)
  scores[..., [3, 6, 9, 12, 15]] = 2.0  # five tied winners spread over four shards
  (_, values, ids), _, _ = _sharded_top_k(scores, 3, (2, 1, 4))
  assert np.asarray(ids)[0, 0].tolist() == [3, 6, 9]
  assert np.asarray(values)[0, 0].tolist() == [2.0, 2.0, 2.0]


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (4, 1, 2)])
def test_top_k_on_meshes_equals_unsharded(mesh_shape):
  """Untied scores: the layout changes nothing, with or without a split bank."""
  rng = np.random.default_rng(1)
  scores = jnp.asarray(rng.normal(size=(8, 6, 64)).astype(np.float32))
  ref = prism_head.sparse_top_k(scores, 5)
  got, _, _ = _sharded_top_k(scores, 5, mesh_shape)
  for a, b in zip(ref, got):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_dense_and_prism_share_the_backbone():
  prism_cfg, dense_cfg = tiny_config(), tiny_config(exp="dense_tiny")
  g_p, p_p = lm.init(prism_cfg, 3)
  g_d, p_d = lm.init(dense_cfg, 3)
  chex.assert_trees_all_equal(p_p["backbone"], p_d["backbone"])
  assert "prototype_head" not in p_d
  batch = random_batch(prism_cfg)
  hidden_p = lm.forward(g_p, p_p, batch).hidden
  out_d = lm.forward(g_d, p_d, batch)
  np.testing.assert_array_equal(hidden_p, out_d.hidden)
  assert out_d.prototypes is None
  np.testing.assert_allclose(out_d.logits, out_d.hidden @ lm.unembedding(p_d).T, rtol=1e-5,
                             atol=1e-5)


def test_scanned_layers_equal_unrolled_layers():
  cfg_loop, cfg_scan = tiny_config(), tiny_config("model.scan_layers=true", "model.remat=full")
  g_l, p_l = lm.init(cfg_loop, 0)
  g_s, p_s = lm.init(cfg_scan, 0)
  # Stack the unrolled blocks' parameters along a leading layers axis.
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[p_l["backbone"]["blocks"][i]
                                                      for i in range(cfg_loop.model.num_layers)])
  p_s = dict(p_s, backbone=dict(p_s["backbone"], blocks=stacked,
                                embedding=p_l["backbone"]["embedding"],
                                final_norm=p_l["backbone"]["final_norm"]),
             prototype_head=p_l["prototype_head"])
  batch = random_batch(cfg_loop)
  np.testing.assert_allclose(lm.forward(g_s, p_s, batch).logits,
                             lm.forward(g_l, p_l, batch).logits, rtol=1e-5, atol=1e-5)


def test_attention_stays_inside_a_document():
  cfg = tiny_config()
  graphdef, params = lm.init(cfg, 0)
  batch = random_batch(cfg)
  segments = np.ones_like(batch["segment_ids"])
  segments[:, 8:] = 2
  positions = np.concatenate([np.arange(8), np.arange(8)])[None].repeat(8, 0).astype(np.int32)
  packed = dict(batch, segment_ids=segments, positions=positions)
  changed = dict(packed, inputs=packed["inputs"].copy())
  changed["inputs"][:, :8] = (changed["inputs"][:, :8] + 1) % cfg.model.vocab_size
  a = lm.forward(graphdef, params, packed).logits
  b = lm.forward(graphdef, params, changed).logits
  # The second document cannot see the first one's tokens.
  np.testing.assert_array_equal(a[:, 8:], b[:, 8:])
  # ... and is scored as if it stood alone at the start of a row.
  alone = dict(batch, inputs=packed["inputs"][:, 8:],
               positions=positions[:, :8], segment_ids=np.ones((8, 8), np.int32))
  np.testing.assert_allclose(lm.forward(graphdef, params, alone).logits, a[:, 8:], rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("similarity, extra", [
    ("cosine", {}), ("dot", {}), ("neg_sq_distance", {}),
    ("cosine", {"thresholds": True}), ("dot", {"base_prototype": True}),
    ("cosine", {"suppress": True}), ("dot", {"whiten": True})])
def test_gradient_through_the_selected_keys_equals_the_dense_gradient(similarity, extra):
  """The head's weights take their gradient from the k gathered keys; the reference mixes
  the dense activations, whose gradient runs through the whole [B, L, M] score product."""
  rng = np.random.default_rng(3)
  b, l, d, m, v, k = 2, 5, 8, 12, 11, 4
  h, keys, values, emb = (jnp.asarray(rng.normal(size=s), jnp.float32)
                          for s in [(b, l, d), (m, d), (m, d), (v, d)])
  thresholds = (jnp.asarray(rng.normal(scale=0.2, size=(m,)), jnp.float32)
                if extra.get("thresholds") else None)
  # 9 of 12 suppressed with k = 4: a suppressed prototype fills the last slot at weight 0
  suppressed = (jnp.arange(m) % 4 != 0) if extra.get("suppress") else None
  cfg = PrototypeConfig(num_prototypes=m, top_k=k, similarity=similarity, mix="gather",
                        base_prototype=extra.get("base_prototype", False))
  probe = jnp.asarray(rng.normal(size=(b, l, v)), jnp.float32)
  whitening = ((jnp.asarray(rng.normal(size=(d,)), jnp.float32),
                jnp.asarray(np.eye(d) + rng.normal(scale=0.3, size=(d, d)), jnp.float32))
               if extra.get("whiten") else None)

  def objective(h, keys, values, log_tau, thresholds, dense):
    logits, out = prism_head.prototype_logits(h, keys, values, log_tau, emb, cfg, suppressed,
                                              thresholds_M=thresholds, whitening=whitening)
    if dense:
      logits = prism_head.logits_from_mixture(
          prism_head.mix_values(out.activations, values), emb)
    return jnp.sum(logits * probe)

  args = (h, keys, values, jnp.log(0.3), thresholds)
  argnums = (0, 1, 2, 3) + ((4,) if thresholds is not None else ())
  sparse = jax.grad(objective, argnums)(*args, False)
  dense = jax.grad(objective, argnums)(*args, True)
  np.testing.assert_allclose(objective(*args, False), objective(*args, True), rtol=1e-5)
  for got, want in zip(sparse, dense):
    scale = float(jnp.abs(want).max())
    assert scale > 0
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * max(1.0, scale))


def test_the_mix_routes_agree_and_auto_gathers_only_when_k_rows_are_smaller_than_the_bank():
  rng = np.random.default_rng(5)
  b, l, d, m, v, k = 2, 3, 5, 9, 7, 3
  h, keys, values, emb = (jnp.asarray(rng.normal(size=s), jnp.float32)
                          for s in [(b, l, d), (m, d), (m, d), (v, d)])
  probe = jnp.asarray(rng.normal(size=(b, l, v)), jnp.float32)

  def objective(h, keys, values, mix):
    cfg = PrototypeConfig(num_prototypes=m, top_k=k, similarity="dot", mix=mix)
    return jnp.sum(prism_head.prototype_logits(h, keys, values, jnp.log(0.3), emb, cfg)[0]
                   * probe)

  grads = {mix: jax.value_and_grad(objective, (0, 1, 2))(h, keys, values, mix)
           for mix in ("gather", "dense")}
  np.testing.assert_allclose(grads["gather"][0], grads["dense"][0], rtol=1e-5)
  for got, want in zip(grads["gather"][1], grads["dense"][1]):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # Only the gather route holds the k selected rows, [B, L, k, D].
  rows = f"f32[{b},{l},{k},{d}]"
  for mix, holds_rows in (("gather", True), ("dense", False)):
    jaxpr = str(jax.make_jaxpr(jax.grad(objective, (0, 1, 2)), static_argnums=3)(
        h, keys, values, mix))
    assert (rows in jaxpr) == holds_rows, mix
  gathers = lambda m_, k_, mix: prism_head.gathers_rows(
      PrototypeConfig(num_prototypes=m_, top_k=k_, mix=mix), 8)
  assert gathers(64, 4, "auto") and not gathers(32, 4, "auto")  # k D = 32
  assert gathers(32, 4, "gather") and not gathers(64, 4, "dense")


@pytest.mark.parametrize("mix", ["gather", "dense"])
def test_straight_through_leaves_the_logits_and_adds_the_dense_heads_gradient_to_h(mix):
  """mix + beta (h - sg(h)): the forward pass is bit-identical, the head's parameters get
  the same gradient, and h gets beta * dL/dmix = beta * (dL/dz) E on top."""
  rng = np.random.default_rng(11)
  b, l, d, m, v, k, beta = 2, 3, 6, 10, 7, 3, 0.5
  h, keys, values, emb = (jnp.asarray(rng.normal(size=s), jnp.float32)
                          for s in [(b, l, d), (m, d), (m, d), (v, d)])
  probe = jnp.asarray(rng.normal(size=(b, l, v)), jnp.float32)

  def objective(h, keys, values, straight_through):
    cfg = PrototypeConfig(num_prototypes=m, top_k=k, similarity="dot", mix=mix,
                          straight_through=straight_through)
    logits, _ = prism_head.prototype_logits(h, keys, values, jnp.log(0.3), emb, cfg)
    return jnp.sum(logits * probe), logits

  (_, plain_logits), plain = jax.value_and_grad(objective, (0, 1, 2), has_aux=True)(
      h, keys, values, 0.0)
  (_, st_logits), st = jax.value_and_grad(objective, (0, 1, 2), has_aux=True)(
      h, keys, values, beta)
  np.testing.assert_array_equal(st_logits, plain_logits)
  np.testing.assert_allclose(st[1], plain[1], rtol=1e-6)  # keys
  np.testing.assert_allclose(st[2], plain[2], rtol=1e-6)  # values
  np.testing.assert_allclose(st[0] - plain[0], beta * jnp.einsum("blv,vd->bld", probe, emb),
                             rtol=1e-5, atol=1e-5)


def test_only_the_train_steps_forward_adds_the_straight_through_gradient():
  """Attribution and control differentiate `lm.forward`: with the option on, their gradients
  must be the model's own (those of the same weights with it off); `training=True` (the
  train step) changes the backbone's gradient and not the logits."""
  cfg = tiny_config("prototypes.straight_through=1")
  graphdef, params = lm.init(cfg, 0)
  plain_graphdef, _ = lm.init(tiny_config("prototypes.straight_through=0"), 0)
  batch = random_batch(cfg)

  def gradient(graphdef, training):
    def loss(p):
      logits = lm.forward(graphdef, p, batch, training=training).logits
      logp = jax.nn.log_softmax(logits)
      return -jnp.mean(jnp.take_along_axis(logp, batch["targets"][..., None], -1))
    return jax.value_and_grad(loss)(params)

  (model_loss, model_grads), (plain_loss, plain_grads) = (gradient(graphdef, False),
                                                           gradient(plain_graphdef, True))
  assert model_loss == plain_loss
  chex.assert_trees_all_close(model_grads, plain_grads, rtol=1e-6, atol=1e-9)
  train_loss, train_grads = gradient(graphdef, True)
  assert train_loss == plain_loss
  embedding = lambda g: np.asarray(g["backbone"]["embedding"])
  assert not np.allclose(embedding(train_grads), embedding(plain_grads), rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("shrinkage", [1e-3, 1.0])
def test_whitening_matrix_maps_each_variance_as_documented(shrinkage):
  rng = np.random.default_rng(6)
  basis, _ = np.linalg.qr(rng.normal(size=(6, 6)))
  variances = np.array([40.0, 5.0, 1.0, 0.5, 0.1, 0.01])
  cov = (basis * variances) @ basis.T
  w = np.asarray(prism_head.whitening_matrix(jnp.asarray(cov, jnp.float32), shrinkage))
  np.testing.assert_allclose(w, w.T, atol=1e-5)
  # along each eigenvector the variance becomes (1 + s) lambda / (lambda + s m)
  m = variances.mean()
  got = np.einsum("di,de,ef,fi->i", basis, w, cov, w @ basis)
  np.testing.assert_allclose(got, (1 + shrinkage) * variances / (variances + shrinkage * m),
                             rtol=2e-3)
  # isotropic h (the RMS-normalised state at init): W = I / sqrt(m)
  np.testing.assert_allclose(prism_head.whitening_matrix(2.0 * jnp.eye(6), shrinkage),
                             np.eye(6) / np.sqrt(2.0), rtol=1e-5, atol=1e-6)
