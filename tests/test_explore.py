"""Prototype explorer: labels, taxonomy, map and the HTML report in headless Chromium."""

import os
import sys

import numpy as np
import pytest

from prism_jax.attribution import common, config as attr_config, index as index_lib, indexing
from prism_jax.explore import labels, projection, taxonomy
from prism_jax.explore.explorer import check_output, explore
from prism_jax.errors import UserError
from prism_jax.models import lm
from tests.synthetic import tiny_config
from tests.text_model import FACTS, CharTokenizer, text_data

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def test_taxonomy_rules():
  cases = {" the": "function", ",": "punctuation", "\n": "punctuation", "</s>": "punctuation",
           " 1776": "number", " twenty": "number", " Washington": "name", "ing": "subword",
           " war": "content"}
  for piece, want in cases.items():
    assert taxonomy.token_category(piece) == want, piece
  assert taxonomy.categorise([" war", " peace", " the"]) == "content"
  assert taxonomy.categorise([" war"], dead=True) == "dead"
  assert set(taxonomy.COLORS) == set(taxonomy.CATEGORIES)


def test_salient_ngrams_prefer_what_is_distinctive():
  docs = [["the red fox [[ran]]", "a red fox [[jumped]]", "the dog [[sat]]"],
          ["the blue sea [[was]]", "the blue sea [[is]]", "the dog [[ran]]"]]
  grams = labels.salient_ngrams(docs, count=3)
  assert grams[0][0][0] in ("red fox", "red", "fox")
  assert grams[1][0][0] in ("blue sea", "the blue sea", "blue", "sea")
  assert all(g != "the" for g, _ in grams[0] + grams[1])  # function words only: skipped


def test_pca_projection_matches_eigendecomposition_with_fixed_signs():
  """PCA written the obvious way: unit rows, centred, projected on the covariance's top two
  eigenvectors; equal up to each axis's sign, which the projection fixes (largest-magnitude
  coordinate positive), so flipping the input's sign cannot flip the map."""
  x = np.random.default_rng(0).normal(size=(20, 8))
  a, method = projection.project(x, "pca")
  assert method == "pca" and a.shape == (20, 2)
  unit = x / np.linalg.norm(x, axis=1, keepdims=True)
  centred = unit - unit.mean(axis=0)
  eigenvalues, vectors = np.linalg.eigh(centred.T @ centred)
  expected = centred @ vectors[:, ::-1][:, :2]  # the two largest components, largest first
  for axis in range(2):
    sign = np.sign(expected[np.argmax(np.abs(expected[:, axis])), axis])
    np.testing.assert_allclose(a[:, axis], sign * expected[:, axis], atol=1e-9)
    assert a[np.argmax(np.abs(a[:, axis])), axis] > 0
  np.testing.assert_allclose(a.var(axis=0) * len(a), eigenvalues[::-1][:2], rtol=1e-9)
  np.testing.assert_allclose(projection.project(-x, "pca")[0], a, atol=1e-12)
  shuffled = np.random.default_rng(1).permutation(20)
  np.testing.assert_allclose(projection.project(x[shuffled], "pca")[0], a[shuffled], atol=1e-9)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  """A report of a tiny random-init model over FACTS text, with a small index."""
  cfg = tiny_config("data.seq_len=32", "model.max_seq_len=64")
  graphdef, params = lm.init(cfg, 0)
  tok = CharTokenizer()
  data = text_data(FACTS, cfg.data.seq_len, cfg.data.batch_size, num_rows=32)
  rows = np.asarray([b["inputs"][0].tolist() + [b["targets"][0][-1]] for b in data.eval_batches()])
  train = common.from_rows(np.concatenate([rows, rows[:, ::-1]]))
  out = str(tmp_path_factory.mktemp("explore"))
  attr = attr_config.AttributionConfig(index_influence=False, neighbourhood_size=8)
  indexing.build(cfg, graphdef, params, train, os.path.join(out, "index"), attr,
                  decode=tok.decode)
  index = index_lib.Index(os.path.join(out, "index"))
  result = explore(cfg, out, graphdef, params, 0, tok, data.eval_batches(), index=index,
                   prompt="a cat is", max_new_tokens=6, out_dir=os.path.join(out, "explore"),
                   progress=False)
  return cfg, result


def test_labels_usage_and_files(report):
  cfg, result = report
  cards = result["cards"]
  assert len(cards) == cfg.prototypes.num_prototypes
  assert all(c["category"] in taxonomy.CATEGORIES for c in cards)
  assert all(len(c["top_tokens"]) == 8 and c["label"] for c in cards)
  assert sum(c["dead"] for c in cards) == result["dead"]
  assert any(c["snippets"] for c in cards) and any(c["ngrams"] for c in cards)
  for path in result["paths"].values():
    assert os.path.getsize(path) > 0
  html = open(result["paths"]["report.html"], encoding="utf-8").read()
  assert "http://" not in html and "https://" not in html  # self-contained
  steps = result["generation"]["tokens"]
  for step in steps:  # the bars add up to the logit
    assert abs(sum(p["contribution"] for p in step["prototypes"]) - step["logit"]) < 1e-3


def test_control_shows_the_explorers_labels_only_for_the_checkpoint_they_describe(
    report, tmp_path, capsys):
  """explore's labels.json records its checkpoint (step 0 here, no commit time): control's
  cards are those labels for that checkpoint; for a later step, or another checkpoint of
  the step (a run trained again), top-token labels of the parameters in use, with a note. A
  labels.json of before the record (a bare list) is read as it is."""
  import json
  from prism_jax.control import study

  cfg, result = report
  saved = json.loads(open(result["paths"]["labels.json"], encoding="utf-8").read())
  assert saved["step"] == 0 and len(saved["cards"]) == cfg.prototypes.num_prototypes
  graphdef, params = lm.init(cfg, 1)
  (tmp_path / "explore").mkdir()
  labels_file = tmp_path / "explore" / "labels.json"
  stamped = labels.labels_record(saved["cards"], 5, 1_000)
  labels_file.write_text(json.dumps(stamped))
  explorer_ids = {c["id"]: c["label"] for c in saved["cards"]}
  cards = study.prototype_cards(str(tmp_path), params, CharTokenizer(), 5, 1_000)
  assert {j: c["label"] for j, c in cards.items()} == explorer_ids
  assert capsys.readouterr().err == ""
  top_tokens = {c["id"]: c["label"] for c in labels.label_prototypes(
      params, CharTokenizer(), None, num_tokens=5)}
  assert top_tokens != explorer_ids  # (other parameters: the two are told apart below)
  for step, saved_ns, why in [(6, 1_000, "checkpoint step 5, not 6"),
                              (5, 2_000, "another checkpoint of step 5")]:
    cards = study.prototype_cards(str(tmp_path), params, CharTokenizer(), step, saved_ns)
    assert {j: c["label"] for j, c in cards.items()} == top_tokens
    assert why in capsys.readouterr().err
  labels_file.write_text(json.dumps(saved["cards"]))  # the bare list: nothing to check
  cards = study.prototype_cards(str(tmp_path), params, CharTokenizer(), 6, 2_000)
  assert {j: c["label"] for j, c in cards.items()} == explorer_ids
  for damaged in ('{"cards": [', '{"step": 5}', '[{"label": "x"}]'):  # labels decorate only
    labels_file.write_text(damaged)
    cards = study.prototype_cards(str(tmp_path), params, CharTokenizer(), 5, 1_000)
    assert {j: c["label"] for j, c in cards.items()} == top_tokens
    assert f"cannot read {labels_file}" in capsys.readouterr().err


def test_an_earlier_report_is_replaced_and_only_it(report, tmp_path):
  _, result = report
  # The fixture's report: the next explore replaces it.
  check_output(os.path.dirname(result["paths"]["labels.json"]))
  old = tmp_path / "old"
  old.mkdir()
  (old / "labels.json").write_text('[{"id": 0, "label": "x"}]')  # the format before 1
  (old / "report.html").write_text("<p>report</p>")
  check_output(str(old))
  (old / "labels.json").write_text('{"mine": true}')
  with pytest.raises(UserError, match="holds labels.json, report.html, not written by"):
    check_output(str(old))


def test_llm_labeller_hook(report):
  fn = labels.load_llm_labeller("tests.test_explore:_fake_labeller")
  assert fn({"id": 3, "top_tokens": []}) == "proto-3"
  assert labels.load_llm_labeller(None) is None


def _fake_labeller(card):
  return f"proto-{card['id']}"


@pytest.mark.parametrize("source, said", [
    ("def label(card):\n  return 'x'\nlabel(", "SyntaxError"),
    ("raise RuntimeError('no API key in the environment')", "RuntimeError: no API key"),
    ("label = 3", "is not callable"),
    ("", "AttributeError"),
])
def test_a_labeller_module_that_cannot_load_is_one_line(tmp_path, monkeypatch, source, said):
  (tmp_path / "my_labeller.py").write_text(source)
  monkeypatch.syspath_prepend(str(tmp_path))
  with pytest.raises(UserError, match=said) as raised:
    labels.load_llm_labeller("my_labeller:label")
  assert "\n" not in str(raised.value)
  sys.modules.pop("my_labeller", None)


def test_a_labeller_that_raises_costs_only_its_own_labels(capsys):
  cfg = tiny_config()
  _, params = lm.init(cfg, 0)

  def flaky(card):  # a remote model that fails every third request
    if card["id"] % 3 == 1:
      raise TimeoutError(f"request {card['id']} timed out\nretry later")
    return f"proto-{card['id']}"

  plain = labels.label_prototypes(params, CharTokenizer())
  cards = labels.label_prototypes(params, CharTokenizer(), llm_labeller=flaky)
  m = cfg.prototypes.num_prototypes
  assert len(cards) == m
  for card, rule in zip(cards, plain):
    if card["id"] % 3 == 1:
      assert card["label"] == rule["label"] and "llm_label" not in card
      assert card["llm_label_error"] == f"TimeoutError: request {card['id']} timed out"
    else:
      assert card["label"] == card["llm_label"] == f"proto-{card['id']}"
      assert "llm_label_error" not in card
  failed = len(range(1, m, 3))
  note = capsys.readouterr().err.strip()
  assert note == (f"note: the LLM labeller raised on {failed} of {m} prototypes (first, "
                  "prototype 1: TimeoutError: request 1 timed out); they keep their rule-based "
                  "labels (llm_label_error in labels.json)")


def _missing(what: str):
  """A missing browser dependency skips on a developer's machine and fails in CI (CI=true,
  where .ci/run installs chromium and fails if it cannot): CI never reports a skip."""
  if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
    pytest.fail(f"{what} (CI=true: a missing test dependency fails, never skips)")
  pytest.skip(what)


def test_report_renders_in_headless_chromium(report, tmp_path):
  if not os.path.exists(CHROMIUM):
    _missing(f"{CHROMIUM} is absent: install Debian's chromium (apt-get install -y chromium)")
  try:
    from playwright import sync_api
  except ImportError:
    _missing("the playwright package is absent (pip install '.[dev]')")
  cfg, result = report
  errors = []
  shot = tmp_path / "report.png"
  with sync_api.sync_playwright() as p:
    browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    page = browser.new_page(viewport={"width": 1280, "height": 1400})
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto("file://" + os.path.abspath(result["paths"]["report.html"]))
    page.wait_for_load_state("load")
    assert page.locator(".card").count() == cfg.prototypes.num_prototypes
    assert page.locator(".card").first.is_visible()
    assert page.locator("svg.bar").count() == len(result["generation"]["tokens"])
    assert page.locator("rect.seg").count() > 0 and page.locator("rect.seg").first.is_visible()
    assert page.locator("#map circle").count() == cfg.prototypes.num_prototypes
    page.screenshot(path=str(shot), full_page=True)
    # The search box filters the cards.
    page.fill("#search", "p3")
    assert page.locator(".card:not(.hidden)").count() == 1
    assert page.locator("#shown").inner_text() == "1"
    browser.close()
  assert errors == []
  assert shot.stat().st_size > 10_000
  try:
    from PIL import Image  # with matplotlib (make eval-data); optional off CI only
  except ImportError:
    _missing("Pillow is absent (make eval-data installs it): the pixel check did not run")
  image = np.asarray(Image.open(shot).convert("RGB"))
  colours = {tuple(int(taxonomy.COLORS[c][i:i + 2], 16) for i in (1, 3, 5))
             for c in taxonomy.CATEGORIES}
  seen = {tuple(px) for px in image.reshape(-1, 3)[::7]}
  assert len(colours & seen) >= 2  # category colours of the bars/cards/map are on screen
