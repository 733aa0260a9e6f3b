"""Automatic prototype labels: top tokens through the unembedding, salient n-grams of the
training neighbourhood (TF-IDF across prototypes), a rule-based category, and an optional
pluggable LLM labeller (off by default).

An LLM labeller is any callable `card -> str` (card: the dict `label_prototypes` builds,
with top_tokens, ngrams and snippets); pass it as `--llm-labeller package.module:function`.
A call that raises leaves that prototype its rule-based label and records the error in its
card (`llm_label_error`): one failed request to a remote model does not cost the others.
"""

from __future__ import annotations

import collections
import importlib
import json
import math
import re
import sys
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from tqdm import tqdm

from prism_jax import layout
from prism_jax.errors import UserError
from prism_jax.explore import taxonomy
from prism_jax.models import lm

LLMLabeller = Callable[[dict], str]
_WORD = re.compile(r"[A-Za-z0-9']+")
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def top_tokens(params, count: int) -> tuple[np.ndarray, np.ndarray]:
  """(token ids [M, count], scores [M, count]) of <U_j, E_y>: what each prototype promotes."""
  scores_MxV = jnp.einsum("md,vd->mv", params["prototype_head"]["values"].astype(jnp.float32),
                          lm.unembedding(params).astype(jnp.float32))
  values, ids = jax.lax.top_k(scores_MxV, count)
  return np.asarray(ids), np.asarray(values)


def piece_text(tokenizer, token_id: int) -> str:
  """A token's surface text with its leading space (sentencepiece '▁' kept as a space)."""
  piece = getattr(tokenizer, "id_to_piece", None)
  if piece is not None:
    try:
      text = piece(int(token_id))
    except (TypeError, IndexError, RuntimeError):
      text = None
    if text is not None:
      byte = _BYTE_PIECE.fullmatch(text)
      if byte:  # sentencepiece byte fallback, e.g. <0x0A> is a newline
        return bytes([int(byte.group(1), 16)]).decode("latin-1")
      return text.replace("\u2581", " ")
  return tokenizer.decode([int(token_id)])


def neighbourhood_spans(index, j: int, count: int) -> list[str]:
  """Up to `count` text spans of prototype j's top activating training positions."""
  if index is None:
    return []
  tokens, _ = index.neighbours(j)
  return [s for s in (index.span(j, r) for r in range(min(count, len(tokens)))) if s]


def neighbourhood_targets(index, j: int, count: int) -> list[int]:
  """The tokens predicted at prototype j's top `count` training positions."""
  if index is None:
    return []
  tokens, _ = index.neighbours(j)
  return [int(t) for t in np.asarray(index.array("tokens/target.npy"))[tokens[:count]]]


def _ngrams(words: Sequence[str], n_max: int) -> list[str]:
  return [" ".join(words[i:i + n]) for n in range(1, n_max + 1)
          for i in range(len(words) - n + 1)]


def _informative(ngram: str) -> bool:
  words = ngram.split()
  return not all(w in taxonomy.FUNCTION_WORDS or w.isdigit() for w in words)


def salient_ngrams(documents: Sequence[Sequence[str]], count: int = 5, n_max: int = 3
                   ) -> list[list[tuple[str, float]]]:
  """TF-IDF n-grams per prototype: each prototype's neighbourhood spans are one document, so
  an n-gram scores high when it is frequent around this prototype and rare around others.
  Returns, per document, [(ngram, score)] best first (function-word-only n-grams skipped)."""
  counts = []
  for spans in documents:
    grams = collections.Counter()
    for span in spans:
      # One count per span: a phrase repeated inside one span is not more salient.
      words = [w.lower() for w in _WORD.findall(span.replace("[[", " ").replace("]]", " "))]
      grams.update(set(_ngrams(words, n_max)))
    counts.append(grams)
  df = collections.Counter(g for grams in counts for g in grams)
  n_docs = len(documents)
  out = []
  for grams in counts:
    scored = [(g, c * (math.log((1 + n_docs) / (1 + df[g])) + 1.0)) for g, c in grams.items()
              if c > 1 and _informative(g)]
    scored.sort(key=lambda t: (-t[1], -len(t[0]), t[0]))
    out.append(scored[:count])
  return out


def load_llm_labeller(spec: str | None) -> LLMLabeller | None:
  """`package.module:function` -> the callable; None when no labeller was asked for."""
  if not spec:
    return None
  module_name, _, name = spec.partition(":")
  try:
    fn = getattr(importlib.import_module(module_name), name)
  except Exception as e:  # noqa: BLE001 -- the user's module: a SyntaxError, its own raise
    detail = f"{type(e).__name__}: {e}".splitlines()[0]
    raise UserError(f"--llm-labeller {spec!r} cannot be loaded ({detail})") from None
  if not callable(fn):
    raise UserError(f"--llm-labeller {spec!r} is not callable")
  return fn


def label_prototypes(params, tokenizer, index=None, usage: np.ndarray | None = None,
                     mean_activation: np.ndarray | None = None, num_tokens: int = 8,
                     num_snippets: int = 6, llm_labeller: LLMLabeller | None = None,
                     progress: bool = False) -> list[dict]:
  """One card per prototype: label, category, top tokens, n-grams, snippets, usage.

  `progress`: a bar over the prototypes while an LLM labeller runs (one call each)."""
  ids, scores = top_tokens(params, num_tokens)
  m = ids.shape[0]
  spans = [neighbourhood_spans(index, j, 64) for j in range(m)]
  ngrams = salient_ngrams(spans)
  cards, failed = [], []
  shown_bar = progress and llm_labeller is not None
  for j in tqdm(range(m), desc="llm labels", unit="prototype", disable=not shown_bar,
                dynamic_ncols=True):
    tokens = [piece_text(tokenizer, t) for t in ids[j]]
    targets = [piece_text(tokenizer, t) for t in neighbourhood_targets(index, j, 16)]
    dead = usage is not None and float(usage[j]) == 0.0
    category = taxonomy.categorise(tokens[:3] + targets, dead=dead)
    shown = " / ".join(repr(t.strip() or t)[1:-1].replace(" ", "␣") for t in tokens[:3])
    label = f"{shown}" + (f" · “{ngrams[j][0][0]}”" if ngrams[j] else "")
    card = {"id": j, "label": label, "category": category,
            "top_tokens": [{"text": t, "score": float(s)} for t, s in zip(tokens, scores[j])],
            "ngrams": [{"text": g, "score": float(s)} for g, s in ngrams[j]],
            "snippets": spans[j][:num_snippets], "dead": bool(dead)}
    if usage is not None:
      card["usage"] = float(usage[j])
    if mean_activation is not None:
      card["mean_activation"] = float(mean_activation[j])
    if llm_labeller is not None:
      try:
        card["llm_label"] = str(llm_labeller(card))
      except Exception as e:  # the user's code (often a remote call): keep the others' labels
        card["llm_label_error"] = f"{type(e).__name__}: {e}".splitlines()[0]
        failed.append(j)
      else:
        card["label"] = card["llm_label"] or card["label"]
    cards.append(card)
  if failed:
    print(f"note: the LLM labeller raised on {len(failed)} of {m} prototypes (first, prototype "
          f"{failed[0]}: {cards[failed[0]]['llm_label_error']}); they keep their rule-based "
          "labels (llm_label_error in labels.json)", file=sys.stderr)
  return cards


LABELS_FORMAT = "prism-labels/1"


def labels_path(workdir: str) -> str:
  return layout.path(workdir, layout.EXPLORE, "labels.json")


def labels_record(cards: list[dict], step: int, saved_ns: int | None) -> dict:
  """labels.json: the cards and the checkpoint they describe (step, Orbax's commit time)."""
  return {"format": LABELS_FORMAT, "step": step, "checkpoint_saved_ns": saved_ns,
          "cards": cards}


def is_labels_file(path) -> bool:
  """True when `path` holds the explorer's labels (a prism-labels/1 record, or the bare list
  of cards written before it)."""
  try:
    saved = json.loads(epath.Path(path).read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return False
  if isinstance(saved, list):
    return all(isinstance(c, dict) and "id" in c and "label" in c for c in saved)
  return isinstance(saved, dict) and saved.get("format") == LABELS_FORMAT


def load_labels(workdir: str) -> tuple[dict[int, dict], tuple] | None:
  """(cards by prototype id, (step, checkpoint_saved_ns) they describe) saved by `python -m
  prism_jax.main.explore`; None when absent, or (with a note) when it cannot be read. A file
  written before the checkpoint was recorded (a bare list of cards) describes (None, None)."""
  path = epath.Path(labels_path(workdir))
  if not path.is_file():
    return None
  try:
    saved = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(saved, list):
      return {int(c["id"]): c for c in saved}, (None, None)
    return ({int(c["id"]): c for c in saved["cards"]},
            (saved.get("step"), saved.get("checkpoint_saved_ns")))
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # labels decorate
    print(f"note: cannot read {path} ({type(e).__name__}: {e}); labelling by top tokens "
          "(run explore again for its labels)", file=sys.stderr)
    return None
