"""The LDS retrain study (attribution/study.py, ground_truth.py, retrain.py, lds.py), reduced:
tiny models and few subsets for the retrains; the statistics against hand computations."""

import json
import os
import pathlib

import chex
import jax
import numpy as np
import pytest

import experiments
from prism_jax.attribution import common, ground_truth, lds, retrain, study, text_examples
from prism_jax.config import apply_overrides
from prism_jax.errors import UserError

TINY = ["model.vocab_size=128", "model.d_model=32", "model.d_ff=64", "model.num_layers=2",
        "model.num_heads=4", "prototypes.num_prototypes=32", "prototypes.top_k=4",
        "data.batch_size=8", "data.seq_len=16", "model.max_seq_len=16", "train.steps=150",
        "optimizer.warmup_steps=10", "train.progress=false"]
DRIVER, A, B = 5, 121, 122  # example DRIVER alone holds the bigram A -> B


def _planted_train(num_examples=16, length=17):
  """Random rows over tokens [0, 120), except row DRIVER: A B A B ... (A, B nowhere else)."""
  rows = np.random.default_rng(0).integers(0, 120, (num_examples, length))
  rows[DRIVER] = np.resize([A, B], length)
  return common.from_rows(rows)


def test_retrains_removing_the_driving_example_lower_the_query(tmp_path):
  """Real retrains, 4 at once: every subset holding DRIVER gives the query's B a higher
  log-probability than every subset without it; a group's retrain is reproducible; cached
  groups are never retrained."""
  cfg = apply_overrides(experiments.get("prism_tiny"), TINY)
  train = _planted_train()
  query = common.Query((7, 3, A), B)
  subsets = ground_truth.draw_subsets(4, 16, 0.5, seed=3)
  with_driver = subsets[:, DRIVER]
  assert 0 < with_driver.sum() < 4, "the fixed subset seed no longer splits DRIVER"
  truth = ground_truth.compute(cfg, train, [query], subsets, 1, 4, str(tmp_path),
                               say=lambda *_: None)
  assert truth["outputs"].shape == (1, 4, 1) and truth["retrained"] == 4
  logp = truth["outputs"][0, :, 0]
  assert logp[with_driver].min() > logp[~with_driver].max() + 1.0, logp
  again = ground_truth.compute(cfg, train, [query], subsets, 1, 4, str(tmp_path),
                               say=lambda *_: None)
  assert again["retrained"] == 0
  np.testing.assert_array_equal(again["outputs"], truth["outputs"])
  # a cached group damaged outside this code (cut short): retrained and replaced, said once
  [cached] = list(pathlib.Path(truth["directory"]).glob("group_*.npz"))
  cached.write_bytes(cached.read_bytes()[:100])
  said = []
  mended = ground_truth.compute(cfg, train, [query], subsets, 1, 4, str(tmp_path),
                                say=said.append)
  assert mended["retrained"] == 4
  np.testing.assert_array_equal(mended["outputs"], truth["outputs"])
  assert said[0] == f"  cached {cached.name} cannot be read (BadZipFile); computing it again"
  members = np.stack([subsets[0]] * 4)
  first = retrain.fit_group(cfg, train, members, [0, 0, 1, 1], [0, 0, 0, 0])
  second = retrain.fit_group(cfg, train, members, [0, 0, 1, 1], [0, 0, 0, 0])
  chex.assert_trees_all_equal(first, second)
  leaf = lambda p: np.asarray(jax.tree.leaves(p)[0])
  np.testing.assert_array_equal(leaf(first)[0], leaf(first)[1])  # same seed, same run
  assert not np.array_equal(leaf(first)[0], leaf(first)[2])     # another seed


def test_schedule_covers_each_member_once_per_epoch():
  members = np.zeros(20, bool)
  members[[1, 4, 9, 13]] = True
  order = retrain.schedule(members, steps=4, batch_size=3, seed=0, stream=7)
  assert order.shape == (4, 3) and set(order.ravel()) == {1, 4, 9, 13}
  assert sorted(order.ravel()[:4]) == [1, 4, 9, 13] and sorted(order.ravel()[4:8]) == [1, 4, 9, 13]
  assert not np.array_equal(order, retrain.schedule(members, 4, 3, seed=0, stream=8))


# ------------------------------------------------------------------------------------------
# Statistics, against hand computations


def _additive(num_queries=20, num_examples=40, num_subsets=60, seeds=3, noise=0.0, seed=0):
  rng = np.random.default_rng(seed)
  effects_QxE = rng.normal(size=(num_queries, num_examples))
  subsets = ground_truth.draw_subsets(num_subsets, num_examples, 0.5, seed)
  clean = subsets @ effects_QxE.T
  outputs = clean[None] + noise * rng.normal(size=(seeds, *clean.shape))
  return effects_QxE, subsets, outputs


def test_oracle_reaches_one_random_zero_and_negated_minus_one():
  effects, subsets, outputs = _additive()
  r = lds.compare({"oracle": effects, "random": np.random.default_rng(5).normal(size=effects.shape),
                   "negated": -effects}, subsets, outputs, samples=200)
  m = r["methods"]
  assert m["oracle"]["lds"] == pytest.approx(1.0) and m["oracle"]["low"] == pytest.approx(1.0)
  assert abs(m["random"]["lds"]) < 0.1 and m["random"]["low"] < 0 < m["random"]["high"]
  assert m["negated"]["lds"] == pytest.approx(-1.0)
  assert r["ceiling"]["ceiling"] == pytest.approx(1.0)  # noiseless seeds agree exactly


def test_bootstrap_is_paired_over_queries_and_subsets():
  """The same draws score every method: a method and a copy of it differ by exactly 0 in
  every replicate, and a slightly perturbed copy's difference interval is far narrower
  than either marginal interval (unpaired draws could not do that)."""
  effects, subsets, outputs = _additive(noise=3.0)
  rng = np.random.default_rng(9)
  noisy = effects + 1.5 * rng.normal(size=effects.shape)
  close = noisy + 0.05 * rng.normal(size=effects.shape)
  r = lds.compare({"a": noisy, "copy": noisy.copy(), "close": close}, subsets, outputs,
                  samples=300, reference="a")["methods"]
  assert r["copy"]["minus_a"] == {"mean": 0.0, "low": 0.0, "high": 0.0}
  width = lambda d: d["high"] - d["low"]
  assert width(r["close"]["minus_a"]) < 0.2 * width(r["a"])
  # Both queries and subsets are resampled: each alone moves the replicates.
  draws = lds.draw(20, 60, 50, seed=0)
  pred, target = lds.predictions(noisy, subsets), outputs.mean(0)
  fixed_q = lds.Resamples(np.tile(np.arange(20), (50, 1)), draws.subsets_BxS)
  fixed_s = lds.Resamples(draws.queries_BxQ, np.tile(np.arange(60), (50, 1)))
  assert np.std(lds.lds_replicates(pred, target, fixed_q)) > 0
  assert np.std(lds.lds_replicates(pred, target, fixed_s)) > 0


def test_ceiling_is_sqrt_of_the_pooled_spearman_brown_reliability():
  _, _, outputs = _additive(num_queries=6, seeds=3, noise=4.0, seed=2)
  # By hand: the Spearman of every seed pair for every query, pooled, then stepped up once.
  from scipy import stats
  rho = np.mean([stats.spearmanr(outputs[i, :, q], outputs[j, :, q]).statistic
                 for q in range(6) for i, j in [(0, 1), (0, 2), (1, 2)]])
  expected = np.sqrt(3 * rho / (1 + 2 * rho))
  c = lds.compare({"x": np.zeros((6, 40))}, ground_truth.draw_subsets(60, 40, 0.5, 2), outputs,
                  samples=50)["ceiling"]
  assert c["seed_agreement"] == pytest.approx(rho)
  assert c["ceiling"] == pytest.approx(expected)
  assert c["low"] <= c["ceiling"] <= c["high"]
  # Not the per-query step-up averaged, which differs whenever queries' agreements differ.
  per_query = np.mean(lds.spearman_brown(lds.seed_agreement(outputs), 3))
  assert lds.spearman_brown(rho, 3) != pytest.approx(per_query, abs=1e-6)


def test_the_ceiling_bounds_the_true_expected_output():
  """The noiseless outputs themselves, as a predictor of the 3-seed mean, land near the
  ceiling (it is the best any predictor can do), and no better."""
  effects, subsets, outputs = _additive(num_queries=60, num_subsets=200, noise=6.0, seed=4)
  r = lds.compare({"truth": effects}, subsets, outputs, samples=50)
  assert r["methods"]["truth"]["lds"] == pytest.approx(r["ceiling"]["ceiling"], abs=0.05)


# ------------------------------------------------------------------------------------------
# The whole study, reduced


def _toy_text(cfg, num_examples=24, queries=4, tuning=3):
  """Rows from 3 random bigram 'topics' (examples of a topic help each other)."""
  rng = np.random.default_rng(0)
  vocab, length = cfg.model.vocab_size, cfg.data.seq_len + 1
  successors = rng.integers(4, vocab, (3, vocab, 2))
  rows = np.zeros((num_examples + queries + tuning, length), np.int64)
  for r in range(len(rows)):
    topic, rows[r, 0] = rng.integers(3), rng.integers(4, vocab)
    for t in range(1, length):
      rows[r, t] = rng.choice(successors[topic, rows[r, t - 1]])
  held = text_examples.queries_from_rows(rows[num_examples:], 0)
  train = common.from_rows(rows[:num_examples])
  copied = text_examples.copied_queries(train, 8, seed=7)
  return text_examples.StudyText(train, held[:queries], held[queries:], "toy bigram rows",
                                 copied[3:], copied[:3])


REDUCED = ["model.vocab_size=64", "model.d_model=16", "model.d_ff=32", "model.num_layers=1",
           "model.num_heads=2", "prototypes.num_prototypes=8", "data.seq_len=12",
           "model.max_seq_len=12", "train.steps=30", "optimizer.warmup_steps=5",
           "attr.lds_examples=24", "attr.lds_subsets=6", "attr.lds_seeds=2",
           "attr.lds_queries=4", "attr.lds_tuning_queries=3", "attr.lds_group=4",
           "attr.lds_bootstrap=50", "attr.trak_projection_dim=8", "attr.batch_size=8",
           "attr.lds_copied_queries=5"]


def test_reduced_study_end_to_end_and_a_rerun_retrains_nothing(tmp_path, monkeypatch):
  cfg, _, _ = study.study_configs(REDUCED)
  text = _toy_text(cfg)
  fitted = []
  real_fit = retrain.fit_group
  monkeypatch.setattr(retrain, "fit_group",
                      lambda c, *a: fitted.append(c.model.head) or real_fit(c, *a))
  workdir = str(tmp_path / "lds")
  quiet = lambda *_: None
  first = study.run_study(REDUCED, workdir, methods=("trak",), say=quiet, text=text)
  # 6 subsets x 2 seeds in groups of 4 (3 groups) + the full-data model, for both heads.
  assert fitted.count("prism") == 4 and fitted.count("dense") == 4
  assert set(first["models"]) == {"prism", "dense"}
  grid = study.DAMPING_GRIDS["trak"][1]
  for m in first["models"].values():
    trak = m["methods"]["trak"]
    assert set(m["methods"]) == {"trak"} and trak["damping"] in grid
    assert set(trak["tuning_lds"]) == {f"{v:g}" for v in grid}
    assert trak["tuning_lds"][f"{trak['damping']:g}"] == max(trak["tuning_lds"].values())
    assert 0 <= m["ceiling"]["ceiling"] <= 1
    assert trak["copied"]["queries"] == 5 and 0 <= trak["copied"]["top1"] <= 1
    assert m["copied_truth"]["queries"] == 5 and 0 <= m["copied_truth"]["top1"] <= 1
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["setup"]["subsets"] == 6
  table = open(os.path.join(workdir, "results.md")).read()
  assert "ceiling" in table and "2-core CPU" in table and "24 training passages" in table
  fitted.clear()
  again = study.run_study(REDUCED, workdir, methods=("trak",), say=quiet, text=text)
  assert fitted == []  # retrains and full-data models all came from the cache
  assert again["models"]["prism"]["methods"]["trak"]["lds"] == pytest.approx(
      first["models"]["prism"]["methods"]["trak"]["lds"])
  # Anything that determines a retrain is in its cache key.
  cfg2, _, attr = study.study_configs(REDUCED + ["train.steps=31"])
  subsets = ground_truth.draw_subsets(6, 24, 0.5)
  key = lambda c, s=subsets, seeds=2: ground_truth.cache_dir(
      workdir, c, text.train, text.retrain_queries(), s, seeds, 4)
  assert len({key(cfg), key(cfg2), key(cfg, subsets[::-1]), key(cfg, seeds=3)}) == 4
  # ... but a config field added later at a default that keeps the old behaviour is not.
  assert "model.scan_layers" not in ground_truth.settings(cfg)
  assert ground_truth.settings(cfg2)["train.steps"] == 31
  assert key(cfg) in {r["cache"] for r in first["setup"]["retrain"].values()}


def test_copied_queries_are_cut_from_their_own_passage():
  rows = np.random.default_rng(0).integers(4, 60, (10, 13))
  train = common.from_rows(rows)
  picked = text_examples.copied_queries(train, 6, seed=1)
  assert len({e for e, _ in picked}) == 6
  for e, q in picked:
    n = len(q.prompt)
    assert n >= text_examples.MIN_PROMPT
    assert list(rows[e, :n]) == list(q.prompt) and rows[e, n] == q.target
  assert picked == text_examples.copied_queries(train, 6, seed=1)  # seeded


@pytest.mark.parametrize("override, message", [
    ("attr.lds_subsets=1", "attr.lds_subsets=1 must be"),
    ("attr.lds_fraction=0", "attr.lds_fraction=0 must be"),
    ("attr.lds_seeds=0", "attr.lds_seeds=0 must be"),
])
def test_bad_study_settings_are_one_line_errors(override, message):
  with pytest.raises(UserError, match=message) as e:
    study.study_configs([override])
  assert "\n" not in str(e.value)


def test_unknown_method_and_a_projection_above_the_subset_size_fail_before_retraining(tmp_path):
  with pytest.raises(UserError, match="unknown method 'nope'"):
    study.run_study([], str(tmp_path), methods=("nope",))
  with pytest.raises(UserError, match="trak_projection_dim=200 must stay below"):
    study.run_study(["attr.trak_projection_dim=200"], str(tmp_path), methods=("trak",))
  assert not os.listdir(tmp_path)


def test_copied_truth_ranks_each_passage_by_its_measured_effect():
  """The retrains' own ranking: a passage whose presence raises the output most ranks 0."""
  rng = np.random.default_rng(0)
  subsets = ground_truth.draw_subsets(40, 10, 0.5, seed=3)
  held = subsets.astype(np.float64)
  small = rng.normal(0, 0.1, (10, 3))  # every passage's small effect on each of 3 queries
  strong = [4, 7, 7]  # query c is copied from passage strong[c] ...
  small[4, 0] = small[7, 1] = 3.0
  small[7, 2] = -3.0  # ... except that passage 7 hurts query 2
  outputs = held @ small + rng.normal(0, 0.05, (2, 40, 3))  # [seeds, subsets, queries]
  truth = {"outputs": np.concatenate([np.zeros((2, 40, 1)), outputs], axis=-1)}
  got = study.copied_truth(truth, subsets, [(e, None) for e in strong], offset=1)
  assert got == {"top1": pytest.approx(2 / 3), "top5": pytest.approx(2 / 3), "queries": 3}
