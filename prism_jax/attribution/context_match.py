"""Fingerprints of what the model read before a position: its last n context tokens.

A query copied from a training passage has, at its scored position, the same recent context
as the position it was copied from. The index stores a 32-bit fingerprint of each
position's last `CONTEXT_TOKENS` input tokens (fewer at the start of a row: the model read
no more), and `single_pass` multiplies the score of a candidate position whose fingerprint
equals the query's by 1 + attr.context_match. Why: the head's gradient sees a context only
through o_t and p_t, so positions predicting the same token from the same prototypes score
alike however different their text; the retrains say the very passage a query was copied
from moves it most (docs/attribution.md). A validation query matches a training position
only where the two share the same 16 tokens of text, so on unseen text the scores rarely
change.

A false match needs two different contexts with equal 32-bit fingerprints among one query's
candidates (at most k T + T' positions): about 3e-5 per query at 1.3e5 candidates.
"""

from __future__ import annotations

import numpy as np

CONTEXT_TOKENS = 16
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)


def _mix(h: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: every input bit reaches the kept top 32 bits."""
  h = h ^ (h >> np.uint64(30))
  h = h * np.uint64(0xBF58476D1CE4E5B9)
  h = h ^ (h >> np.uint64(27))
  h = h * np.uint64(0x94D049BB133111EB)
  return h ^ (h >> np.uint64(31))


def fingerprints(inputs_BxL: np.ndarray, n: int = CONTEXT_TOKENS) -> np.ndarray:
  """uint32 [B, L]: position p's fingerprint of inputs[b, max(0, p - n + 1) : p + 1].

  Each row is one context as the model read it (a chunk or a query's prompt), so a
  position near a row's start has a shorter context and its fingerprint covers only that.
  """
  tokens = np.asarray(inputs_BxL, np.int64)
  if tokens.ndim != 2:
    raise ValueError(f"inputs must be [batch, length], got shape {tokens.shape}")
  length = tokens.shape[1]
  h = np.zeros(tokens.shape, np.uint64)
  with np.errstate(over="ignore"):  # the hash wraps modulo 2^64 by design
    for back in range(n - 1, -1, -1):  # oldest first; 0 marks "before the row's start"
      shifted = np.zeros(tokens.shape, np.uint64)
      if back < length:
        shifted[:, back:] = (tokens[:, :length - back] + 1).astype(np.uint64)
      h = h * _MULTIPLIER + shifted
    return (_mix(h) >> np.uint64(32)).astype(np.uint32)


def of_prompt(prompt, n: int = CONTEXT_TOKENS) -> int:
  """The fingerprint of a query's scored position (the last of its prompt)."""
  row = np.asarray(prompt, np.int64)[None, -n:]
  return int(fingerprints(row, n)[0, -1])


def boost(query_fingerprint: int | None, fingerprints_N: np.ndarray, weight: float
          ) -> np.ndarray:
  """[N]: 1 + weight where a position's fingerprint equals the query's, else 1."""
  same = (np.asarray(fingerprints_N, np.uint32) == np.uint32(query_fingerprint)
          if query_fingerprint is not None and weight else
          np.zeros(len(fingerprints_N), bool))
  return np.where(same, 1.0 + weight, 1.0)
