"""`index` then `attribute` through their entry points, on a model trained on FACTS.

The index covers every token of every training document (four documents, one fact each);
`attribute` with no --method uses the default, single_pass, and a prompt copied from one
document's middle brings that document back first.
"""

from __future__ import annotations

import json

import pytest

from prism_jax import data as data_lib
from prism_jax import restore
from prism_jax.attribution import run as run_lib
from prism_jax.main import attribute, index
from tests.text_model import FACTS, CharTokenizer, trained_text_model

DOCUMENTS = [sentence.strip() + "." for sentence in FACTS.split(".") if sentence.strip()]


@pytest.fixture(scope="module")
def run_dir():
  workdir, _ = trained_text_model()
  bundle = data_lib.DataBundle(tokenizer=CharTokenizer(),
                               train_source=[{"text": d * 3} for d in DOCUMENTS],
                               validation_source=[{"text": FACTS * 4}])
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(data_lib, "prepare", lambda *a, **k: bundle)
    patch.setattr(restore, "load_tokenizer", lambda cfg: bundle.tokenizer)
    yield workdir


def test_index_covers_every_token_then_attribute_finds_the_document(run_dir, tmp_path, capsys):
  # The trained run is shared by the session's tests: the index goes to this test's folder.
  built = ["--index", str(tmp_path / "index")]
  index.main(["--exp", "prism_tiny", "--workdir", run_dir, *built])
  printed = capsys.readouterr().out
  # Every token of each document (BOS + text + EOS) is a target once: len + 1 per document.
  expected = sum(len(CharTokenizer().encode(d * 3)) + 1 for d in DOCUMENTS)
  assert f"indexed {len(DOCUMENTS)} documents, {expected} positions" in printed, printed
  assert "per indexed token" in printed
  index.main(["--exp", "prism_tiny", "--workdir", run_dir, *built])  # nothing to do
  assert "is up to date (step 150, the same settings and documents): nothing to do" in (
      capsys.readouterr().out)

  out = tmp_path / "found.json"
  # A prompt from the middle of document 1 ("a dog is blue."), its next token asked for.
  attribute.main(["--exp", "prism_tiny", "--workdir", run_dir, *built,
                  "--prompt", "blue. a dog is",
                  "--target-token", " ", "--json", str(out)])
  found = json.loads(out.read_text())
  assert found["method"] == run_lib.DEFAULT_METHOD == "single_pass"
  assert found["results"][0]["example_id"] == 1, found["results"]
  assert "[[" in found["results"][0]["text"]
  # The same --json again: its own earlier record is replaced (anything else is refused).
  attribute.main(["--exp", "prism_tiny", "--workdir", run_dir, *built,
                  "--prompt", "red. a cat is", "--json", str(out)])
  assert json.loads(out.read_text())["prompt"] == "red. a cat is"


def test_a_target_after_a_space_is_the_word_not_a_bare_space(tmp_path):
  """' ship' after 'the whale' is '▁ship' as in running text; on its own sentencepiece
  encodes it as a bare '▁' and then '▁ship', and the bare space is not what was asked."""
  from prism_jax.data.tokenizer import train_tokenizer
  from tests.test_data import _synthetic_texts

  tok = train_tokenizer(_synthetic_texts(300, seed=1), 400, str(tmp_path / "t.model"))
  assert [tok.id_to_piece(i) for i in tok.encode(" ship")] == ["▁", "▁ship"]
  prompt_ids, ship = tok.encode("the whale"), tok.encode("ship")
  assert [tok.id_to_piece(i) for i in ship] == ["▁ship"]
  for prompt, target in (("the whale", " ship"), ("the whale ", "ship"), ("the whale", "ship")):
    assert attribute.encode_target(tok, prompt, target) == (prompt_ids, ship), (prompt, target)
