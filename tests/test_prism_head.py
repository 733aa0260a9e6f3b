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


@pytest.mark.parametrize("similarity", ["cosine", "neg_sq_distance"])
def test_contributions_sum_to_every_logit(similarity):
  cfg = tiny_config(f"prototypes.similarity={similarity}")
  _, params, _, out = _forward(cfg)
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


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (4, 1, 2), (2, 1, 4), (1, 1, 8)])
def test_sharded_top_k_equals_unsharded(mesh_shape):
  rng = np.random.default_rng(1)
  scores = jnp.asarray(rng.normal(size=(8, 6, 64)).astype(np.float32))
  ref = prism_head.sparse_top_k(scores, 5)
  cfg = MeshConfig(data=mesh_shape[0], fsdp=mesh_shape[1], model=mesh_shape[2])
  mesh = sharding.make_mesh(cfg)
  with jax.set_mesh(mesh), sharding.use_rules(cfg.rules):
    spec = sharding.logical_to_spec(("batch", "length", "prototypes"))
    sharded_scores = jax.device_put(scores, jax.sharding.NamedSharding(mesh, spec))
    got = jax.jit(lambda s: prism_head.sparse_top_k(s, 5))(sharded_scores)
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
