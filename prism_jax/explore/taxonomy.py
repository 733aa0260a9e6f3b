"""A fixed, documented taxonomy of prototype categories, assigned by rules.

A prototype is categorised from the tokens it promotes (top tokens through the unembedding,
`U_j E^T`) and, when an index is available, the tokens its training neighbourhood predicts
(the highlighted [[token]] of each span). Each token votes for one category; the category
with most votes wins (ties: the order below). `dead` overrides everything when the prototype
was never active on the evaluation set.

  punctuation   punctuation, symbols, whitespace, special tokens      , . ; " ( -- \\n </s>
  number        digits, numerals, ordinals                           1776 twenty fifth
  function      closed-class words: articles, pronouns, prepositions, conjunctions,
                auxiliaries and common adverbs                       the of and was it
  name          capitalised word starting a word, not a function word Washington Mr
  subword       a word piece with no leading space (continues a word) ing ed tion
  content       any other word (nouns, verbs, adjectives, ...)       war people great
  dead          never active on the evaluation set
"""

from __future__ import annotations

import collections
import string
from typing import Iterable

CATEGORIES = ("punctuation", "number", "function", "name", "subword", "content", "dead")
COLORS = {"punctuation": "#8c564b", "number": "#9467bd", "function": "#1f77b4",
          "name": "#d62728", "subword": "#ff7f0e", "content": "#2ca02c", "dead": "#7f7f7f"}

FUNCTION_WORDS = frozenset("""
a an the this that these those some any each every no all both either neither
i me my mine we us our ours you your yours he him his she her hers it its they them their theirs
who whom whose which what where when why how whoever whatever
of in on at by for with about against between into through during before after above below to
from up down out off over under again further then once upon within without among toward
and or but nor so yet if because as until while than though although since unless whether
is am are was were be been being have has had having do does did doing will would shall should
can could may might must not no nor only own same too very just also there here now
""".split())
NUMBER_WORDS = frozenset("""
one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen
sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety
hundred thousand million billion first second third fourth fifth sixth seventh eighth ninth
tenth half
""".split())
_SPACE_MARKS = (" ", "\u2581", "\n", "\t")


def token_category(piece: str) -> str:
  """Category of one token's surface text (sentencepiece '▁' or a space marks a word start)."""
  starts_word = piece[:1] in _SPACE_MARKS
  word = piece.strip("".join(_SPACE_MARKS))
  special = word.startswith("<") and word.endswith(">")  # </s>, <unk>, byte pieces
  if not word or special or not any(ch.isalnum() for ch in word):
    return "punctuation"
  lowered = word.lower().strip(string.punctuation)
  if lowered.isdigit() or lowered in NUMBER_WORDS or lowered.rstrip("stndrh").isdigit():
    return "number"
  if lowered in FUNCTION_WORDS:
    return "function"
  if not starts_word:
    return "subword"
  if word[:1].isupper():
    return "name"
  return "content"


def categorise(pieces: Iterable[str], dead: bool = False) -> str:
  """The majority category of the tokens (ties broken by CATEGORIES order)."""
  if dead:
    return "dead"
  votes = collections.Counter(token_category(p) for p in pieces)
  if not votes:
    return "content"
  best = max(votes.values())
  return next(c for c in CATEGORIES if votes.get(c) == best)
