"""SentencePiece tokenizer: trained on the train split only, loaded by path.

Ids: pad=0, unk=1, bos=2, eos=3. Byte fallback and identity-preserving normalisation (NFKC,
no whitespace collapsing) make decode(encode(text)) == text for NFKC-normal text, newlines
included (a newline is the byte piece <0x0A>).
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
from typing import Iterable, Sequence

import sentencepiece as spm
from etils import epath

from prism_jax.errors import UserError

log = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Tokenizer:
  """A thin, picklable wrapper over a SentencePiece model."""

  def __init__(self, model_proto: bytes, path: str = ""):
    self.path = path
    self._proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    if self._sp.pad_id() != PAD_ID:
      raise UserError(f"tokenizer {path or '<bytes>'} has pad id {self._sp.pad_id()}; "
                      f"this project needs pad id {PAD_ID}")

  @classmethod
  def load(cls, path: str) -> Tokenizer:
    try:
      proto = epath.Path(path).read_bytes()  # epath: local paths and gs:// alike
    except OSError as e:
      raise UserError(f"cannot read tokenizer {path}: {e.strerror or e}") from None
    try:
      return cls(proto, path)
    except (RuntimeError, OSError) as e:
      raise UserError(f"{path} is not a sentencepiece model ({e})") from None

  # Grain may copy the map function into threads; the C++ processor does not pickle.
  def __getstate__(self):
    return {"path": self.path, "proto": self._proto}

  def __setstate__(self, state):
    self.__init__(state["proto"], state["path"])

  @property
  def fingerprint(self) -> str:
    """SHA-256 of the model's bytes: which tokenizer a run trained with."""
    return hashlib.sha256(self._proto).hexdigest()

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def pad_id(self) -> int:
    return PAD_ID

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_batch(self, texts: Sequence[str], num_threads: int = 2) -> list[list[int]]:
    return self._sp.encode(list(texts), num_threads=num_threads)

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))


def _lines(texts: Iterable[str]) -> Iterable[str]:
  """SentencePiece trains on sentences without newlines: one line at a time."""
  for text in texts:
    for line in text.split("\n"):
      if line.strip():
        yield line


def train_tokenizer(texts: Iterable[str], vocab_size: int, path: str, *,
                    model_type: str = "unigram", max_sentences: int = 300_000,
                    num_threads: int = 2, seed: int = 0) -> Tokenizer:
  """Trains on (a uniform sample of at most max_sentences lines of) texts; saves to path.

  The sample is drawn here (reservoir sampling, fixed seed) rather than by SentencePiece so
  training time is bounded and the model is reproducible.
  """
  rng = random.Random(seed)
  sample: list[str] = []
  for n, line in enumerate(_lines(texts)):
    if len(sample) < max_sentences:
      sample.append(line)
    else:
      j = rng.randrange(n + 1)
      if j < max_sentences:
        sample[j] = line
  if not sample:
    raise UserError("cannot train a tokenizer: the training text is empty")
  log.info("training a %d-piece %s sentencepiece model on %d lines", vocab_size, model_type,
           len(sample))
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sample), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, byte_fallback=True, character_coverage=0.9995,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        normalization_rule_name="nfkc", remove_extra_whitespaces=False,
        split_digits=True, max_sentence_length=1 << 16, input_sentence_size=0,
        shuffle_input_sentence=False, num_threads=num_threads, seed_sentencepiece_size=1_000_000,
        minloglevel=2)
  except RuntimeError as e:
    # e.g. "Vocabulary size is smaller than required_chars" / "too high": one line for users.
    raise UserError(f"sentencepiece training failed for vocab_size={vocab_size}: "
                    f"{str(e).splitlines()[-1]}") from None
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / f"{target.name}.tmp"
  tmp.write_bytes(model.getvalue())
  tmp.replace(target)  # atomic: a crashed run never leaves a half-written model
  return Tokenizer(model.getvalue(), path)
