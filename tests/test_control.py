"""Linear prototype controllers and targeted suppression (prism_jax/control)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prism_jax.control import controller as ctl
from prism_jax.control import suppress as sup
from prism_jax.errors import UserError
from prism_jax.models import lm, prism_head
from tests.synthetic import ROUND_ONE_HEAD, random_batch, tiny_config


@pytest.fixture(scope="module")
def model():
  cfg = tiny_config("data.batch_size=16", "data.seq_len=32", "model.max_seq_len=32",
                    *ROUND_ONE_HEAD)
  graphdef, params = lm.init(cfg, 0)
  batch = random_batch(cfg, 0)
  return cfg, graphdef, params, batch


def _forward(graphdef, **kwargs):
  return jax.jit(lambda p, b: lm.forward(graphdef, p, b, **kwargs))


def test_identity_controller_is_bit_exact(model):
  cfg, graphdef, params, batch = model
  plain = jax.jit(lambda p, b: lm.forward(graphdef, p, b))(params, batch)
  controlled = jax.jit(lambda p, b, c: lm.forward(graphdef, p, b, controller=c))(
      params, batch, ctl.zeros(cfg.prototypes.num_prototypes))
  for name in ("logits", "hidden"):
    np.testing.assert_array_equal(getattr(plain, name), getattr(controlled, name))
  for name in ("activations", "top_values", "top_indices", "scores"):
    np.testing.assert_array_equal(getattr(plain.prototypes, name),
                                  getattr(controlled.prototypes, name))


def test_controller_keeps_contributions_exact_and_sparse(model):
  cfg, graphdef, params, batch = model
  m = cfg.prototypes.num_prototypes
  rng = np.random.default_rng(1)
  c = prism_head.Controller(gain_M=jnp.asarray(rng.normal(0, 0.8, m), jnp.float32),
                            bias_M=jnp.asarray(rng.normal(0, 0.5, m), jnp.float32))
  plain = lm.forward(graphdef, params, batch).prototypes
  out = lm.forward(graphdef, params, batch, controller=c)
  p = out.prototypes
  # Same selection; a' >= 0, zero wherever a was zero; top_values hold a'.
  np.testing.assert_array_equal(p.top_indices, plain.top_indices)
  assert float(jnp.min(p.activations)) >= 0.0
  assert not np.any((np.asarray(plain.activations) == 0) & (np.asarray(p.activations) != 0))
  np.testing.assert_allclose(jnp.take_along_axis(p.activations, p.top_indices, -1),
                             p.top_values, rtol=1e-6, atol=1e-6)
  assert not np.allclose(p.top_values, plain.top_values)
  contrib = prism_head.contributions_all_tokens(p.top_values, p.top_indices,
                                                params["prototype_head"]["values"],
                                                lm.unembedding(params))
  np.testing.assert_allclose(contrib.sum(axis=2), out.logits, rtol=1e-4, atol=1e-4)
  # The fitting path (features only, head maths) gives the model's own log-probabilities.
  k = cfg.prototypes.top_k
  logp = ctl.position_logprobs(c, params["prototype_head"]["values"], lm.unembedding(params),
                               plain.top_values.reshape(-1, k),
                               plain.top_indices.reshape(-1, k), batch["targets"].reshape(-1))
  want = jnp.take_along_axis(jax.nn.log_softmax(out.logits), batch["targets"][..., None],
                             -1).reshape(-1)
  np.testing.assert_allclose(logp, want, rtol=1e-4, atol=1e-4)


def _planted_features(cfg, params, out, planted: int, seed: int):
  """Pairs of positions, one where `planted` is active, one where it is not; both score the
  token that `planted` promotes most; the gold choice is the one where it is active."""
  k = cfg.prototypes.top_k
  values = np.asarray(out.prototypes.top_values).reshape(-1, k)
  indices = np.asarray(out.prototypes.top_indices).reshape(-1, k)
  active = np.any((indices == planted) & (values > 0), axis=1)
  promoted = int(np.argmax(np.asarray(
      params["prototype_head"]["values"][planted] @ lm.unembedding(params).T)))
  rng = np.random.default_rng(seed)
  on, off = rng.permutation(np.flatnonzero(active)), rng.permutation(np.flatnonzero(~active))
  n = min(len(on), len(off))
  gold = rng.integers(0, 2, n)
  pos = np.where(gold[:, None] == 0, np.stack([on[:n], off[:n]], 1),
                 np.stack([off[:n], on[:n]], 1))                     # [n, 2] positions
  return ctl.ChoiceFeatures(
      top_values=values[pos.reshape(-1)], top_indices=indices[pos.reshape(-1)].astype(np.int32),
      targets=np.full(2 * n, promoted, np.int32),
      example=np.repeat(np.arange(n), 2).astype(np.int32),
      choice=np.tile([0, 1], n).astype(np.int32),
      choice_mask=np.ones((n, 2), bool), labels=gold.astype(np.int32))


def test_fitted_controller_finds_the_planted_prototype(model):
  cfg, graphdef, params, batch = model
  out = lm.forward(graphdef, params, batch)
  k = cfg.prototypes.top_k
  indices = np.asarray(out.prototypes.top_indices).reshape(-1, k)
  share = np.asarray([np.mean(np.any(indices == j, 1)) for j in range(
      cfg.prototypes.num_prototypes)])
  planted = int(np.argmin(np.abs(share - 0.4)))  # active at a good fraction of positions
  feats = _planted_features(cfg, params, out, planted, seed=0)
  half = feats.num_examples // 2
  cal_idx, held_idx = np.arange(half), np.arange(half, feats.num_examples)
  cal = _subset(feats, cal_idx)
  held = _subset(feats, held_idx)
  values, unembed = params["prototype_head"]["values"], lm.unembedding(params)
  m = cfg.prototypes.num_prototypes
  before = ctl.accuracy(ctl.zeros(m), values, unembed, held)
  fitted, losses = ctl.fit(cal, values, unembed, m, ctl.FitConfig(steps=300), progress=False)
  after = ctl.accuracy(fitted, values, unembed, held)
  top = ctl.strongest(fitted, 3)
  assert top[0]["prototype"] == planted and top[0]["gain"] > 0
  assert after >= 0.85 and after > before + 0.2, (before, after)
  assert np.mean(losses[-10:]) < np.mean(losses[:10])
  # Sparse: most prototypes carry no correction at all.
  assert np.count_nonzero(np.asarray(fitted.gain_M)) < m // 2


def _subset(feats, examples):
  keep = np.isin(feats.example, examples)
  remap = np.full(feats.num_examples, -1)
  remap[examples] = np.arange(len(examples))
  return ctl.ChoiceFeatures(feats.top_values[keep], feats.top_indices[keep],
                            feats.targets[keep], remap[feats.example[keep]].astype(np.int32),
                            feats.choice[keep], feats.choice_mask[examples],
                            feats.labels[examples])


def test_suppression_zeroes_the_prototype_and_spares_other_positions(model):
  cfg, graphdef, params, batch = model
  plain = jax.jit(lambda p, b: lm.forward(graphdef, p, b))(params, batch)
  indices = np.asarray(plain.prototypes.top_indices)
  values = np.asarray(plain.prototypes.top_values)
  counts = np.bincount(indices[values > 0], minlength=cfg.prototypes.num_prototypes)
  target = int(np.argmax(counts))
  mask = sup.mask_from_ids([target], cfg.prototypes.num_prototypes)
  out = jax.jit(lambda p, b, s: lm.forward(graphdef, p, b, s))(params, batch, mask)
  p = out.prototypes
  assert float(jnp.max(jnp.abs(p.activations[..., target]))) == 0.0
  contrib = prism_head.contributions_all_tokens(p.top_values, p.top_indices,
                                                params["prototype_head"]["values"],
                                                lm.unembedding(params))
  assert float(jnp.max(jnp.abs(jnp.where((p.top_indices == target)[..., None], contrib,
                                         0.0)))) == 0.0
  np.testing.assert_allclose(contrib.sum(axis=2), out.logits, rtol=1e-4, atol=1e-4)
  was_active = np.any((indices == target) & (values > 0), axis=-1)
  assert was_active.any() and (~was_active).any()
  np.testing.assert_array_equal(np.asarray(out.logits)[~was_active],
                                np.asarray(plain.logits)[~was_active])
  np.testing.assert_array_equal(np.asarray(p.top_indices)[~was_active], indices[~was_active])
  # Where it was active the next best prototype filled in: still k selected, none of them it.
  assert not np.any(np.asarray(p.top_indices)[was_active] == target)


def test_controller_and_suppression_files_round_trip(tmp_path):
  m = 12
  c = prism_head.Controller(gain_M=jnp.linspace(-1, 1, m, dtype=jnp.float32),
                            bias_M=jnp.full(m, 0.125, jnp.float32))
  path = ctl.save(str(tmp_path / "controllers" / "piqa.json"), c, {"task": "piqa"})
  back = ctl.load(path, m)
  np.testing.assert_array_equal(back.gain_M, c.gain_M)
  np.testing.assert_array_equal(back.bias_M, c.bias_M)
  with pytest.raises(UserError, match="prototypes"):
    ctl.load(path, m + 1)
  with pytest.raises(UserError, match="no controller"):
    ctl.load(str(tmp_path / "missing.json"))
  spath = sup.save(str(tmp_path / "s.json"), [3, 1], {"words": ["war"]})
  np.testing.assert_array_equal(np.flatnonzero(sup.load(spath, m)), [1, 3])
  with pytest.raises(UserError, match="does not exist"):
    sup.mask_from_ids([m], m)
  # Each reader refuses the other's file, and a truncated one, in one line.
  with pytest.raises(UserError, match="is not a prism-suppression/1 file"):
    sup.load(path, m)
  with pytest.raises(UserError, match="is not a prism-controller/1 file"):
    ctl.load(spath, m)
  (tmp_path / "cut.json").write_text(open(path).read()[:40])
  with pytest.raises(UserError, match="cannot read controller .*JSONDecodeError"):
    ctl.load(str(tmp_path / "cut.json"), m)


def test_word_family_and_neighbourhood_selection():
  from tests.text_model import CharTokenizer

  family = sup.word_family(CharTokenizer(), 128, ["a", "b"])
  assert family[ord("a")] and family[ord("B")] and family.sum() == 4

  class FakeIndex:
    manifest = {"num_prototypes": 3}

    def neighbours(self, j):
      return np.arange(4), np.ones(4)

    def span(self, j, r):
      return ["the war [[began]]", "war and [[peace]]", "tea [[time]]", "sea [[side]]"][
          (r + j) % 4] if j < 2 else "nothing [[here]]"

  hits = sup.by_neighbourhood(FakeIndex(), "WAR", min_share=0.5, top=4)
  assert [j for j, _ in hits] == [0, 1]
  cards = {0: {"top_tokens": [{"text": " LORD"}, {"text": " the"}], "label": "LORD / the"},
           1: {"top_tokens": [{"text": " the"}], "label": "the · “the lord”"},
           2: {"top_tokens": [{"text": ","}], "label": ",", "llm_label": "the Lord's speech"}}
  assert sup.by_label(cards, "lord") == [0, 2]


def test_label_choice_ranks_the_best_matches_first_so_the_cap_keeps_them():
  """--max-prototypes keeps the head of by_label's list: the prototypes that promote the
  token most (its place among their top tokens, then its score), not the lowest ids."""
  card = lambda *tokens: {"top_tokens": [{"text": t, "score": s} for t, s in tokens]}
  cards = {1: card((" the", 9.0), (" LORD", 8.0)),        # second place
           4: card((" LORD", 2.0), (" the", 1.0)),        # first place, low score
           7: {**card((",", 5.0)), "llm_label": "speaks of the Lord"},  # LLM label only
           9: card((" Lord", 6.0)),                       # first place, high score
           12: card((" king", 7.0))}                      # no match
  assert sup.by_label(cards, "lord") == [9, 4, 1, 7]
  assert sup.by_label(cards, "lord")[:2] == [9, 4]
  assert sup.by_label(cards, "queen") == []


def test_mention_rate_counts_generations_with_the_family():
  from tests.text_model import CharTokenizer

  class FakeGenerator:
    def __call__(self, params, ids, max_new_tokens, seed=0):
      tokens = [ord("x")] * max_new_tokens
      if seed == 0:
        tokens[1] = ord("a")
      return type("G", (), {"token_ids": tokens})()

  family = sup.word_family(CharTokenizer(), 128, ["a"])
  rate = sup.mention_rate(FakeGenerator(), None, CharTokenizer(), ["p", "q"], family,
                          samples=4, max_new_tokens=5)
  assert rate == {"generations": 8, "mention_rate": 0.25, "family_token_share": 2 / 40}


def test_calibration_report_keeps_the_tasks_not_recalibrated(tmp_path):
  from prism_jax.control import records
  path = str(tmp_path / "report.json")
  first = {"experiment": "prism_tiny", "step": 100,
           "tasks": {"piqa": {"step": 100, "heldout_gain": 0.1},
                     "sciq": {"step": 100, "heldout_gain": 0.2}}}
  records.save(path, records.merged_report(path, first))  # no report yet
  second = {"experiment": "prism_tiny", "step": 200,
            "tasks": {"sciq": {"step": 200, "heldout_gain": 0.3}}}
  merged = records.merged_report(path, second)
  assert merged["step"] == 200
  assert merged["tasks"] == {"piqa": {"step": 100, "heldout_gain": 0.1},   # kept as it was
                             "sciq": {"step": 200, "heldout_gain": 0.3}}   # recalibrated
  (tmp_path / "report.json").write_text("{not json")  # an unreadable old report is replaced
  assert records.merged_report(path, second) == second


def test_calibration_report_drops_tasks_of_a_checkpoint_trained_over(tmp_path):
  """A run deleted and trained again to the same step: the tasks calibrated on the first
  model's checkpoint (another commit time) describe a model that is gone."""
  from prism_jax.control import records
  path = str(tmp_path / "report.json")
  old = {"step": 100, "checkpoint_saved_ns": 1}
  records.save(path, {"experiment": "prism_tiny", **old, "tasks": {
      "piqa": {**old, "heldout_gain": 0.1}, "sciq": {**old, "heldout_gain": 0.2},
      "arc_easy": {"step": 50, "checkpoint_saved_ns": 0, "heldout_gain": 0.3},
      "hellaswag": {"step": 100, "heldout_gain": 0.4}}})  # recorded no commit time
  new = {"step": 100, "checkpoint_saved_ns": 2}
  merged = records.merged_report(path, {"experiment": "prism_tiny", **new, "tasks": {
      "sciq": {**new, "heldout_gain": 0.5}}})
  assert merged["tasks"] == {"arc_easy": {"step": 50, "checkpoint_saved_ns": 0,
                                          "heldout_gain": 0.3},
                             "hellaswag": {"step": 100, "heldout_gain": 0.4},
                             "sciq": {**new, "heldout_gain": 0.5}}


def test_an_intervention_made_on_another_checkpoint_is_applied_with_a_warning(tmp_path, capsys):
  """--controller/--suppress from a later or earlier step (prototypes moved) or from another
  checkpoint of the same step (a run trained again: ids name other prototypes) are applied
  as asked, each with one warning line; one made on the loaded checkpoint, or recording no
  checkpoint, is applied silently."""
  import argparse
  import numpy as np
  from prism_jax.control import controller as control_lib, interventions, suppress as sup

  class Run:
    def saved_ns(self, step):
      return 1_000

  controller = control_lib.Controller(gain_M=np.zeros(4, np.float32),
                                      bias_M=np.zeros(4, np.float32))
  made = control_lib.save(str(tmp_path / "c.json"), controller,
                          {"step": 5, "checkpoint_saved_ns": 1_000})
  old = sup.save(str(tmp_path / "s.json"), [1], {"step": 5})  # before commit times were kept

  def warnings(step, **files):
    interventions.warn_if_made_elsewhere(
        argparse.Namespace(controller=files.get("c"), suppress=files.get("s")), Run(), step)
    return capsys.readouterr().err

  assert warnings(5, c=made, s=old) == ""
  assert warnings(6, c=made) == (f"warning: --controller {made} was made on checkpoint step 5, "
                                 "not 6: its prototypes have moved since\n")
  assert "--suppress" in warnings(4, s=old)
  made_again = control_lib.save(str(tmp_path / "c2.json"), controller,
                                {"step": 5, "checkpoint_saved_ns": 999})
  assert warnings(5, c=made_again) == (
      f"warning: --controller {made_again} was made on another checkpoint of step 5 (a run "
      "trained again?): its prototype ids name other prototypes\n")
