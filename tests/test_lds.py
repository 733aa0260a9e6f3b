"""The LDS retrain study (prism_jax/lds.py, attribution/lds.py, attribution/retrain.py), reduced:
tiny models, few steps, few subsets; and exactly additive toys where retraining is faked."""

import os

import chex
import numpy as np
import pytest

from prism_jax import lds
from prism_jax.attribution import common, lds as lds_lib, retrain
from prism_jax.attribution.config import AttributionConfig
from prism_jax.config import apply_overrides
from tests.synthetic import tiny_config
from tests.test_attribution import TRAINED_OVERRIDES

DRIVER, A, B = 5, 121, 122  # example DRIVER alone holds the bigram A -> B


def _planted_train(cfg, num_examples=16):
  """Random rows over tokens [0, 120), except row DRIVER: A B A B ... (A, B nowhere else)."""
  rows = np.random.default_rng(0).integers(0, 120, (num_examples, cfg.data.seq_len + 1))
  rows[DRIVER] = np.resize([A, B], cfg.data.seq_len + 1)
  return common.from_rows(rows)


def test_ground_truth_removing_the_driving_example_lowers_the_query(tmp_path):
  """Retrained for real: every subset holding DRIVER gives the query's B a higher
  log-probability than every subset without it; a seed's retrain is reproducible."""
  cfg = tiny_config(*TRAINED_OVERRIDES)  # test_attribution's: its compiled step is reused
  train = _planted_train(cfg)
  query = common.Query((7, 3, A), B)
  attr = AttributionConfig(lds_subsets=4, lds_seeds=1, lds_fraction=0.5, lds_queries=1)
  truth = lds.ground_truth(cfg, train, [query], attr, str(tmp_path / "gt.npz"),
                           say=lambda *_: None)
  subsets, outputs = truth["subsets"], truth["outputs"]
  assert subsets.shape == (4, 16) and outputs.shape == (1, 4, 1)
  with_driver = subsets[:, DRIVER]
  assert 0 < with_driver.sum() < 4, "the fixed subset seed no longer splits DRIVER"
  logp = outputs[0, :, 0]
  assert logp[with_driver].min() > logp[~with_driver].max() + 1.0, logp
  # Deterministic per seed: the same subset and seed retrain to the same parameters.
  # (One seed only: each seed compiles its own train step, the cost of this test.)
  subset = train.subset(np.nonzero(subsets[0])[0])
  chex.assert_trees_all_equal(retrain.fit(cfg, subset, seed=0), retrain.fit(cfg, subset, seed=0))


@pytest.fixture
def additive_toy(monkeypatch):
  """Retraining faked by an exactly additive model: the query's output on a subset is the
  sum of fixed per-example contributions. Returns (contributions [Q, E], fit calls)."""
  effects_QxE = np.random.default_rng(1).normal(size=(24, lds.NUM_TRAIN))
  calls = []

  def fit(cfg, train, seed, steps=None):
    calls.append((cfg.train.steps, seed, train.num_examples))
    return train.example_ids  # the "parameters": which examples were trained on

  def log_probs_fn(graphdef):
    return lambda ids, batch, positions, targets: effects_QxE[:len(positions), ids].sum(1)

  monkeypatch.setattr(retrain, "fit", fit)
  monkeypatch.setattr(lds, "_log_probs_fn", log_probs_fn)
  return effects_QxE, calls


def _toy_truth(tmp_path, name, attr):
  cfg = lds.study_config()
  train = common.from_rows(np.zeros((lds.NUM_TRAIN, cfg.data.seq_len + 1), np.int32))
  queries = [common.Query((1, 2), 3)] * attr.lds_queries
  return lds.ground_truth(cfg, train, queries, attr, str(tmp_path / name), say=lambda *_: None)


def test_oracle_scores_reach_lds_one_and_random_scores_zero(additive_toy, tmp_path):
  effects_QxE, _ = additive_toy
  attr = AttributionConfig(lds_subsets=200, lds_seeds=2, lds_fraction=0.25, lds_queries=24)
  truth = _toy_truth(tmp_path, "a.npz", attr)
  subsets, outputs = truth["subsets"], truth["outputs"]
  # Subsets: [subsets, examples], each example kept with probability lds_fraction.
  assert subsets.shape == (200, lds.NUM_TRAIN) and subsets.dtype == bool
  assert abs(subsets.mean() - 0.25) < 0.03
  np.testing.assert_allclose(outputs[0], subsets @ effects_QxE.T)  # stored per subset
  oracle = lds_lib.summary(effects_QxE, subsets, outputs, samples=200)
  assert oracle["lds"] == pytest.approx(1.0) and oracle["low"] == pytest.approx(1.0)
  noise = np.random.default_rng(2).normal(size=effects_QxE.shape)
  random = lds_lib.summary(noise, subsets, outputs, samples=200)
  assert abs(random["lds"]) < 0.1 and random["low"] < 0 < random["high"]
  assert lds_lib.summary(-effects_QxE, subsets, outputs, samples=200)["lds"] == pytest.approx(-1)
  # Deterministic: the same subsets and outputs again (not from the cache: another path).
  again = _toy_truth(tmp_path, "b.npz", attr)
  np.testing.assert_array_equal(again["subsets"], subsets)
  np.testing.assert_array_equal(again["outputs"], outputs)


def test_retrain_cache_is_reused_and_invalidated_by_a_config_change(additive_toy, tmp_path):
  _, calls = additive_toy
  attr = AttributionConfig(lds_subsets=3, lds_seeds=2, lds_queries=2, lds_bootstrap=10)
  workdir = str(tmp_path / "study")

  def study(cfg, attr=attr):
    before = len(calls)
    lds.run_study(cfg, attr, workdir, methods=(), say=lambda *_: None)
    caches = sorted(f for f in os.listdir(workdir) if f.startswith("ground_truth_"))
    return len(calls) - before, caches

  cfg = lds.study_config()
  fits, caches = study(cfg)
  assert fits == 3 * 2 + 1 and len(caches) == 1  # 3 subsets x 2 seeds, the full-data model
  fits, same = study(lds.study_config())  # an equal config: the retrains are reused
  assert fits == 1 and same == caches
  fits, changed = study(apply_overrides(cfg, ["train.steps=81"]))
  assert fits == 3 * 2 + 1 and len(changed) == 2
  fits, changed = study(cfg, AttributionConfig(lds_subsets=4, lds_seeds=2, lds_queries=2,
                                               lds_bootstrap=10))
  assert fits == 4 * 2 + 1 and len(changed) == 3
