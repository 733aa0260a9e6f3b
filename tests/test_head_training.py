"""Head updates made by the train step outside the gradient (issue #13): the keys' own
learning rate, renormalisation, selection-only balancing bias and dead-prototype revival."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prism_jax import sharding
from prism_jax.config import OptimizerConfig
from prism_jax.optim import make_optimizer
from prism_jax.step import compile_steps, to_global_batch, update_head_state
from tests.synthetic import random_batch, tiny_config


def test_key_lr_scale_multiplies_only_the_key_update():
  params = {"prototype_head": {"keys": jnp.ones((4, 3)), "values": jnp.ones((4, 3))}}
  grads = jax.tree.map(lambda x: 0.1 * x, params)
  updates = {}
  for scale in (1.0, 10.0):
    tx = make_optimizer(OptimizerConfig(key_lr_scale=scale, warmup_steps=0, weight_decay=0.0),
                        100)
    updates[scale], _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates[10.0]["prototype_head"]["keys"],
                             10 * updates[1.0]["prototype_head"]["keys"], rtol=1e-6)
  np.testing.assert_array_equal(updates[10.0]["prototype_head"]["values"],
                                updates[1.0]["prototype_head"]["values"])
  # The default keeps the optimizer state's structure (old checkpoints still restore).
  default = make_optimizer(OptimizerConfig(), 100)
  assert len(default.init(params)) == 2
  assert optax.tree.norm(updates[1.0]) > 0


def _head(cfg, m=6, d=4):
  params = {"prototype_head": {"keys": jnp.asarray(np.random.default_rng(0).normal(
      size=(m, d)), jnp.float32)}}
  head = params["prototype_head"]
  if cfg.prototypes.revive_after:
    head["idle_steps"] = jnp.zeros((m,))
  if cfg.prototypes.selection_bias_rate:
    head["selection_bias"] = jnp.zeros((m,))
  if cfg.prototypes.whiten_rate:
    head["hidden_mean"], head["hidden_cov"], head["whitening"] = (
        jnp.zeros((d,)), jnp.eye(d), jnp.eye(d))
  return params


def test_revival_resets_keys_dead_for_n_steps_to_hidden_states():
  cfg = tiny_config("prototypes.revive_after=2", "prototypes.key_init_std=0.5")
  params = _head(cfg)
  hidden = jnp.asarray(np.random.default_rng(1).normal(size=(1, 3, 4)), jnp.float32)
  mask = jnp.array([[1.0, 1.0, 0.0]])  # the padded token is never a revival source
  usage = jnp.array([1, 0, 0, 2, 0, 1])
  original = params["prototype_head"]["keys"]
  params, m = update_head_state(params, usage, hidden, mask, jnp.int32(0), cfg)
  np.testing.assert_array_equal(params["prototype_head"]["keys"], original)  # idle 1 < 2
  params, m = update_head_state(params, usage.at[2].set(1), hidden, mask, jnp.int32(1), cfg)
  keys = np.asarray(params["prototype_head"]["keys"])
  assert int(m["prototypes/revived"]) == 2  # prototypes 1 and 4: idle for 2 steps
  sources = 0.5 * np.asarray(hidden[0, :2])
  for j in (1, 4):
    assert any(np.allclose(keys[j], s) for s in sources)
  for j in (0, 2, 3, 5):
    np.testing.assert_array_equal(keys[j], original[j])
  np.testing.assert_array_equal(params["prototype_head"]["idle_steps"], [0, 0, 0, 0, 0, 0])


def test_selection_bias_moves_towards_equal_load_and_renorm_keeps_norms():
  cfg = tiny_config("prototypes.selection_bias_rate=0.01", "prototypes.key_renorm=true",
                    "prototypes.key_init_std=0.25")
  params = _head(cfg)
  usage = jnp.array([5, 0, 1, 0, 2, 4])  # mean 2
  params, _ = update_head_state(params, usage, jnp.zeros((1, 2, 4)), jnp.ones((1, 2)),
                                jnp.int32(0), cfg)
  np.testing.assert_allclose(params["prototype_head"]["selection_bias"],
                             [-0.01, 0.01, 0.01, 0.01, 0.0, -0.01])
  np.testing.assert_allclose(np.linalg.norm(params["prototype_head"]["keys"], axis=1),
                             0.25 * 2.0, rtol=1e-5)


def test_variant_train_steps_run_and_keep_head_state_out_of_the_gradient():
  cfg = tiny_config("prototypes.selection_bias_rate=0.01", "prototypes.revive_after=1",
                    "prototypes.thresholds=true", "prototypes.key_init_std=0.177",
                    "prototypes.key_renorm=true", "losses.stop_data_gradient=true",
                    "losses.diversity_reduce=per_prototype", "optimizer.key_lr_scale=4",
                    "prototypes.whiten_rate=0.1")
  steps = compile_steps(cfg, sharding.make_mesh(cfg.mesh))
  state = steps.init()
  batch = to_global_batch(random_batch(cfg, 0), steps.batch_sharding)
  for _ in range(2):
    state, metrics = steps.train_step(state, batch)
  metrics = jax.device_get(metrics)
  assert np.isfinite(metrics["loss/total"]) and metrics["nonfinite/total"] == 0
  head = jax.device_get(state.params["prototype_head"])
  assert np.abs(head["selection_bias"]).sum() > 0  # moved by the balancing rule
  assert np.abs(head["whitening"] - np.eye(32)).max() > 1e-3  # the running statistics moved
  np.testing.assert_allclose(np.linalg.norm(head["keys"], axis=1), 0.177 * np.sqrt(32),
                             rtol=1e-4)


def test_whitening_statistics_follow_the_batch_and_whiten_it():
  cfg = tiny_config("prototypes.whiten_rate=1.0")  # rate 1: the statistics of this batch
  d = 4
  params = _head(cfg, d=d)
  rng = np.random.default_rng(2)
  mixing = rng.normal(size=(d, d))
  h = rng.normal(size=(1, 400, d)) @ mixing + 3.0  # correlated, off-centre
  mask = np.ones((1, 400))
  params, _ = update_head_state(params, jnp.ones((6,), jnp.int32), jnp.asarray(h, jnp.float32),
                                jnp.asarray(mask), jnp.int32(0), cfg)
  head = params["prototype_head"]
  np.testing.assert_allclose(head["hidden_mean"], h[0].mean(0), rtol=1e-4)
  whitened = (h[0] - np.asarray(head["hidden_mean"])) @ np.asarray(head["whitening"])
  # unit covariance, up to the eps * mean eigenvalue added for conditioning
  np.testing.assert_allclose(np.cov(whitened.T, bias=True), np.eye(d), atol=0.05)
  np.testing.assert_allclose(head["whitening"], np.asarray(head["whitening"]).T, atol=1e-5)
