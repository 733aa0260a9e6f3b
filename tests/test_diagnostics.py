"""Head diagnostics (prism_jax/diagnostics.py) against references written the obvious way,
and the train step logging them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prism_jax import diagnostics, sharding
from prism_jax.step import compile_steps, initial_keys, to_global_batch
from tests.synthetic import random_batch, tiny_config


def _cos(a, b):
  return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_diagnostics_match_numpy_reference():
  rng = np.random.default_rng(0)
  b, l, d, m, k = 2, 5, 6, 7, 3
  h = rng.normal(size=(b, l, d)).astype(np.float32)
  keys = rng.normal(size=(m, d)).astype(np.float32)
  init = rng.normal(size=(m, d)).astype(np.float32)
  top = np.abs(rng.normal(size=(b, l, k))).astype(np.float32)
  top[0, 0] = 0.0                                   # a token with no active mass
  mask = np.ones((b, l), np.float32)
  mask[1, 3:] = 0.0                                 # padding is not counted
  usage = np.array([5, 0, 1, 0, 2, 2, 0], np.float32)
  got = jax.device_get(diagnostics.head_diagnostics(h, top, usage, mask, keys, init))

  tokens = [(i, t) for i in range(b) for t in range(l) if mask[i, t] > 0]
  best = [max(_cos(h[i, t], keys[j]) for j in range(m)) for i, t in tokens]
  drift = [_cos(keys[j], init[j]) for j in range(m)]
  pairs = [_cos(keys[i], keys[j]) for i in range(m) for j in range(m) if i != j]
  p = usage[usage > 0] / usage.sum()
  shares = [top[i, t].max() / top[i, t].sum() for i, t in tokens if top[i, t].sum() > 0]
  np.testing.assert_allclose(got["prototypes/best_match_cos"], np.median(best), rtol=1e-5)
  np.testing.assert_allclose(got["prototypes/key_drift_cos"], np.median(drift), rtol=1e-5)
  np.testing.assert_allclose(got["prototypes/key_pair_cos"], np.mean(pairs), rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(got["prototypes/usage_perplexity"],
                             np.exp(-(p * np.log(p)).sum()), rtol=1e-5)
  np.testing.assert_allclose(got["prototypes/top1_share"], np.mean(shares), rtol=1e-5)


def test_extremes_uniform_usage_and_collapsed_keys():
  usage = np.full((16,), 3.0, np.float32)
  assert abs(float(diagnostics.usage_perplexity(usage)) - 16.0) < 1e-4
  one = np.zeros((16,), np.float32)
  one[4] = 9.0
  assert abs(float(diagnostics.usage_perplexity(one)) - 1.0) < 1e-6
  keys = np.tile(np.arange(1.0, 5.0, dtype=np.float32), (6, 1))
  assert abs(float(diagnostics.key_pair_cos(keys)) - 1.0) < 1e-5
  assert abs(float(diagnostics.key_drift_cos(keys, 3.0 * keys)) - 1.0) < 1e-5


def test_train_step_logs_diagnostics_and_key_drift_starts_at_one():
  cfg = tiny_config("optimizer.warmup_steps=0", "optimizer.learning_rate=0.05",
                    "train.log_every=1")
  steps = compile_steps(cfg, sharding.make_mesh(cfg.mesh))
  state = steps.init()
  # The recomputed initial keys are the keys the run started from.
  with jax.set_mesh(steps.mesh), sharding.use_rules(cfg.mesh.rules):
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda: initial_keys(cfg))()),
                                  np.asarray(state.params["prototype_head"]["keys"]))
  batch = to_global_batch(random_batch(cfg, 0), steps.batch_sharding)
  drifts = []
  for _ in range(3):
    state, metrics = steps.train_step(state, batch)
    metrics = jax.device_get(metrics)
    drifts.append(float(metrics["prototypes/key_drift_cos"]))
    for name in ("best_match_cos", "key_pair_cos", "usage_perplexity", "dead_in_batch",
                 "top1_share"):
      assert np.isfinite(metrics[f"prototypes/{name}"]), name
  assert abs(drifts[0] - 1.0) < 1e-6  # measured on the parameters before the first update
  assert drifts[-1] < drifts[0]       # ... and they move
  assert 1.0 <= metrics["prototypes/usage_perplexity"] <= cfg.prototypes.num_prototypes


def test_key_drift_is_measured_on_the_steps_the_loop_logs():
  cfg = tiny_config("train.log_every=3", "train.steps=5")
  steps = compile_steps(cfg, sharding.make_mesh(cfg.mesh))
  state = steps.init()
  batch = to_global_batch(random_batch(cfg, 0), steps.batch_sharding)
  measured = []
  for _ in range(5):  # the loop reports steps 1..5 and logs 3 (log_every) and 5 (the last)
    state, metrics = steps.train_step(state, batch)
    measured.append(bool(np.isfinite(jax.device_get(metrics["prototypes/key_drift_cos"]))))
  assert measured == [False, False, True, False, True]


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_best_match_from_the_heads_summary_equals_the_direct_product(similarity):
  """The train step reads best-match from the head's nearest distance (1 - cos)."""
  rng = np.random.default_rng(4)
  h = rng.normal(size=(2, 3, 5)).astype(np.float32)
  keys = rng.normal(size=(4, 5)).astype(np.float32)
  from prism_jax.models import head_summary, prism_head
  scores, dist = prism_head.similarity_and_distance(h, keys, similarity)
  top = np.ones((2, 3, 2), np.float32)
  summary = head_summary.summarise(top, np.zeros((2, 3, 2), np.int32), 1.0,
                                   scores.reshape(6, 4), dist.reshape(6, 4), np.ones(6))
  args = (h, top, np.ones((4,), np.float32), np.ones((2, 3)), keys)
  direct = diagnostics.head_diagnostics(*args)["prototypes/best_match_cos"]
  reused = diagnostics.head_diagnostics(*args, best_cos_N=1.0 - summary.nearest_distance_N)
  np.testing.assert_allclose(reused["prototypes/best_match_cos"], direct, rtol=1e-5)


def test_hidden_geometry_reads_directions_and_the_banks_use():
  from benchmarks.hidden_geometry import geometry
  from prism_jax.models import lm
  from tests.synthetic import random_batch, tiny_config

  cfg = tiny_config()
  graphdef, params = lm.init(cfg, 0)
  batches = [random_batch(cfg, s) for s in range(2)]
  g = geometry(graphdef, params, batches, cfg.prototypes.top_k)
  assert 1.0 <= g["participation_ratio"] <= g["dimension"] == cfg.model.d_model
  assert 0.0 < g["top1_share"] <= g["top5_share"] <= 1.0
  assert 0.0 <= g["common_energy"] <= 1.0 and 0.0 <= g["unused"] <= 1.0
  assert -1.0 <= g["use_vs_token_spread"] <= 1.0
  # every key collapsed onto one direction: a prototype's use no longer varies with it
  head = dict(params["prototype_head"])
  head["keys"] = jnp.broadcast_to(head["keys"][:1], head["keys"].shape)
  collapsed = geometry(graphdef, {**params, "prototype_head": head}, batches,
                       cfg.prototypes.top_k)
  assert collapsed["unused"] > g["unused"]


@pytest.mark.parametrize("argv, message", [
    (["--steps", "5"], "no checkpoints in"),
    (["--steps", "-1"], "--steps must be checkpoint steps >= 0"),
    (["--steps", "0", "--batches", "0"], "--batches at least 1"),
])
def test_hidden_geometry_refuses_bad_input_in_one_line(tmp_path, capsys, argv, message):
  from benchmarks import hidden_geometry

  with pytest.raises(SystemExit) as exit_info:
    hidden_geometry.main(["--exp", "prism_tiny", "--workdir", str(tmp_path / "none"), *argv])
  err = capsys.readouterr().err.strip()
  assert exit_info.value.code == 2 and err.splitlines() == [err] and message in err, err
