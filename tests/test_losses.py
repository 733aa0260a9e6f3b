"""Each clustering objective on hand-made inputs where its value is known."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from prism_jax import losses
from prism_jax.models import prism_head


def _distances(h_NxD, keys_MxD, similarity="cosine"):
  _, dist = prism_head.similarity_and_distance(h_NxD[None], keys_MxD, similarity)
  return dist[0]


def test_cluster_is_zero_when_every_hidden_state_is_a_prototype():
  keys = jnp.asarray(np.random.default_rng(0).normal(size=(6, 4)), jnp.float32)
  h = keys[jnp.array([0, 3, 3, 5])]
  for similarity in ["cosine", "neg_sq_distance"]:
    dist = _distances(h, keys, similarity)
    assert abs(float(losses.cluster_loss(dist, jnp.ones(4)))) < 1e-5
  # Moving one state away makes it positive; masking that state out makes it zero again.
  h_far = h.at[0].set(-h[0] + 0.5)
  dist = _distances(h_far, keys, "neg_sq_distance")
  assert float(losses.cluster_loss(dist, jnp.ones(4))) > 0.1
  assert abs(float(losses.cluster_loss(dist, jnp.array([0.0, 1, 1, 1])))) < 1e-5


def test_evidence_is_zero_iff_every_prototype_has_a_token_on_it():
  keys = jnp.eye(3, 5)
  h_all = jnp.concatenate([keys, 2 * keys[:1]])  # every prototype has a token at distance 0
  assert abs(float(losses.evidence_loss(_distances(h_all, keys), jnp.ones(4)))) < 1e-6
  # Without the tokens on prototype 2, its nearest token is orthogonal: cosine distance 1.
  value = losses.evidence_loss(_distances(h_all, keys), jnp.array([1.0, 1, 0, 1]))
  np.testing.assert_allclose(value, 1.0 / 3.0, rtol=1e-6)


def test_diversity_penalises_only_pairs_above_the_margin():
  orthogonal = jnp.eye(4, 8)
  assert float(losses.diversity_loss(orthogonal, margin=0.5)) == 0.0
  duplicated = jnp.stack([jnp.eye(4)[0], jnp.eye(4)[0], jnp.eye(4)[1]])
  # One unordered pair with cos=1 (counted twice) over M(M-1)=6 ordered pairs.
  np.testing.assert_allclose(losses.diversity_loss(duplicated, margin=0.5), 2 * 0.25 / 6)


def test_balance_is_one_for_uniform_usage_and_larger_when_collapsed():
  m, k = 4, 1
  scores = jnp.zeros((8, m))  # uniform routing probabilities
  uniform_usage = jnp.full((m,), 2)
  np.testing.assert_allclose(losses.balance_loss(scores, uniform_usage, jnp.ones(8), k), 1.0)
  collapsed_scores = jnp.zeros((8, m)).at[:, 0].set(10.0)
  collapsed_usage = jnp.zeros((m,), jnp.int32).at[0].set(8)
  assert float(losses.balance_loss(collapsed_scores, collapsed_usage, jnp.ones(8), k)) > 3.9


def test_cross_entropy_matches_reference_and_ignores_masked_tokens():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
  targets = rng.integers(0, 5, (2, 3))
  mask = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  picked = np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
  expected = -(picked * mask).sum() / mask.sum()
  value, count = losses.cross_entropy(logits, targets, mask)
  np.testing.assert_allclose(value, expected, rtol=1e-6)
  assert float(count) == 3.0


def test_dead_fraction_counts_unused_prototypes():
  # Two positions, k = 2: position 0 selected prototypes 1 and 2 (2 at weight 0, which is
  # no use), position 1 selected 3 and 0.
  top_values = jnp.asarray([[[1.0, 0.0], [2.0, 0.5]]])
  top_indices = jnp.asarray([[[1, 2], [3, 0]]])
  usage = losses.usage_counts(top_values, top_indices, jnp.ones((1, 2)), 4)
  np.testing.assert_array_equal(usage, [1, 1, 0, 1])
  assert float(losses.dead_fraction(usage)) == 0.25
  # Positions outside the loss mask do not count as use.
  usage_masked = losses.usage_counts(top_values, top_indices, jnp.array([[1.0, 0.0]]), 4)
  assert float(losses.dead_fraction(usage_masked)) == 0.75


def test_usage_from_the_top_k_equals_the_count_of_the_dense_activations():
  rng = np.random.default_rng(6)
  scores = jnp.asarray(rng.normal(size=(3, 5, 11)), jnp.float32)  # relu zeros some choices
  mask = jnp.asarray(rng.integers(0, 2, (3, 5)), jnp.float32)
  activations, top_values, top_indices = prism_head.sparse_top_k(scores, 4)
  dense = jnp.sum((activations > 0) & (mask[..., None] > 0), axis=(0, 1))
  assert int(jnp.sum(top_values == 0)) > 0 and int(jnp.sum(dense)) > 0
  np.testing.assert_array_equal(losses.usage_counts(top_values, top_indices, mask, 11), dense)


def test_per_prototype_diversity_is_the_pair_mean_times_m_minus_one():
  keys = jnp.asarray(np.random.default_rng(2).normal(size=(6, 3)), jnp.float32)
  mean_pairs = losses.diversity_loss(keys, margin=0.0)
  per_prototype = losses.diversity_loss(keys, margin=0.0, reduce="per_prototype")
  assert float(mean_pairs) > 0
  np.testing.assert_allclose(per_prototype, mean_pairs * 5, rtol=1e-5)


def _head_case(seed, length, d):
  """(h [1, length, d], keys [5, d], a batch of that length, a 5-prototype top-2 config)."""
  from prism_jax.config import PrototypeConfig
  rng = np.random.default_rng(seed)
  h = jnp.asarray(rng.normal(size=(1, length, d)), jnp.float32)
  keys = jnp.asarray(rng.normal(size=(5, d)), jnp.float32)
  batch = {"targets": jnp.zeros((1, length), jnp.int32), "loss_mask": jnp.ones((1, length))}
  return h, keys, batch, PrototypeConfig(num_prototypes=5, top_k=2)


def _term_metrics(h, keys, batch, head_cfg, vocab: int, **weights):
  """The loss metrics of the head (keys as values, a zero unembedding) on one case, with
  only the given LossConfig fields set; the logits carry no gradient."""
  from prism_jax.config import LossConfig
  from prism_jax.models.lm import LMOutput

  cfg = LossConfig(**{"cluster": 0.0, "evidence": 0.0, "diversity": 0.0, "balance": 0.0,
                      **weights})
  logits, protos = prism_head.prototype_logits(h, keys, keys, jnp.log(0.1),
                                               jnp.zeros((vocab, h.shape[-1])), head_cfg)
  out = LMOutput(logits=jax.lax.stop_gradient(logits), hidden=h, prototypes=protos)
  return losses.total_loss(out, batch, keys, cfg, 2, head_cfg.similarity)[1]


def test_stop_data_gradient_keeps_the_clustering_pull_off_the_hidden_states():
  h, keys, batch, pcfg = _head_case(0, 4, 3)

  def clustering(h, keys, stop):
    metrics = _term_metrics(h, keys, batch, pcfg, 2, cluster=1.0, evidence=1.0,
                            stop_data_gradient=stop)
    return metrics["loss/cluster"] + metrics["loss/evidence"]

  value_and_grad = jax.jit(jax.value_and_grad(clustering, argnums=(0, 1)), static_argnums=2)
  values = []
  for stop in (False, True):
    value, (g_h, g_keys) = value_and_grad(h, keys, stop)
    values.append(value)
    assert float(jnp.abs(g_keys).sum()) > 0          # keys are pulled either way
    assert (float(jnp.abs(g_h).sum()) == 0) == stop  # h only without the stop
  np.testing.assert_allclose(values[1], values[0], rtol=1e-6)


def test_balance_keys_only_moves_the_keys_exactly_as_the_full_term_and_never_h():
  h, keys, batch, pcfg = _head_case(1, 6, 4)
  for similarity in ("cosine", "dot"):
    head_cfg = dataclasses.replace(pcfg, similarity=similarity)

    def balance(h, keys, keys_only):
      return _term_metrics(h, keys, batch, head_cfg, 2, balance=1.0,
                           balance_keys_only=keys_only)["loss/balance"]

    value_and_grad = jax.jit(jax.value_and_grad(balance, argnums=(0, 1)), static_argnums=2)
    full, (g_h_full, g_keys_full) = value_and_grad(h, keys, False)
    keys_only, (g_h, g_keys) = value_and_grad(h, keys, True)
    np.testing.assert_allclose(keys_only, full, rtol=1e-6)
    assert float(jnp.abs(g_h_full).sum()) > 0
    assert float(jnp.abs(g_h).sum()) == 0
    np.testing.assert_allclose(g_keys, g_keys_full, rtol=1e-5, atol=1e-6)


def test_nearest_pair_losses_equal_the_dense_losses_in_value_and_gradient():
  """cluster/evidence recompute only the nearest pairs; the dense min over [N, M] is the
  reference for the value and for the gradient into both h and the keys."""
  rng = np.random.default_rng(1)
  h = jnp.asarray(rng.normal(size=(9, 6)), jnp.float32)
  keys = jnp.asarray(rng.normal(size=(7, 6)), jnp.float32)
  mask = jnp.asarray([1, 1, 0, 1, 1, 1, 0, 1, 1], jnp.float32)
  for similarity in ("cosine", "dot", "neg_sq_distance"):
    pairs = [(losses.nearest_key_loss, losses.cluster_loss),
             (losses.nearest_token_loss, losses.evidence_loss)]
    for gathered, dense in pairs:
      def via_pairs(h, keys):
        return gathered(h, keys, _distances(h, keys, similarity), mask, similarity)

      def via_dense(h, keys):
        return dense(_distances(h, keys, similarity), mask)

      got_value, got_grads = jax.jit(jax.value_and_grad(via_pairs, (0, 1)))(h, keys)
      want_value, want_grads = jax.jit(jax.value_and_grad(via_dense, (0, 1)))(h, keys)
      np.testing.assert_allclose(got_value, want_value, rtol=1e-5)
      for got, want in zip(got_grads, want_grads):
        assert float(jnp.abs(want).max()) > 0
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_a_term_at_weight_zero_is_reported_and_adds_no_gradient():
  from prism_jax.config import LossConfig
  from prism_jax.models.lm import LMOutput

  h, keys, batch, pcfg = _head_case(2, 6, 4)

  def objective(h, balance):
    _, protos = prism_head.prototype_logits(h, keys, keys, jnp.log(0.1), jnp.zeros((2, 4)),
                                            pcfg)
    out = LMOutput(logits=jnp.zeros((1, 6, 2)), hidden=h, prototypes=protos)
    cfg = LossConfig(cluster=0.0, evidence=0.0, diversity=0.0, balance=balance)
    loss, metrics = losses.total_loss(out, batch, keys, cfg, 2)
    return loss, metrics["loss/balance"]

  value_and_grad = jax.jit(jax.value_and_grad(objective, has_aux=True), static_argnums=1)
  (_, reported), g_off = value_and_grad(h, 0.0)
  _, g_on = value_and_grad(h, 1.0)
  assert float(reported) > 0.5                    # computed and logged
  assert float(jnp.abs(g_off).sum()) == 0         # but no pull at weight 0
  assert float(jnp.abs(g_on).sum()) > 0


def test_sampled_diversity_is_an_unbiased_estimate_of_the_all_pairs_term():
  keys = jnp.asarray(np.random.default_rng(4).normal(size=(12, 3)), jnp.float32)
  for reduce in ("mean_pairs", "per_prototype"):
    full = float(losses.diversity_loss(keys, 0.0, reduce))
    draws = [float(losses.diversity_loss(keys, 0.0, reduce, 4, jax.random.key(i)))
             for i in range(400)]
    assert full > 0 and len(set(draws)) > 10          # the subsets differ from step to step
    np.testing.assert_allclose(np.mean(draws), full, rtol=0.08)
  # a sample at least the bank size is the exact term
  np.testing.assert_allclose(losses.diversity_loss(keys, 0.0, "mean_pairs", 12, jax.random.key(0)),
                             losses.diversity_loss(keys, 0.0), rtol=1e-6)
