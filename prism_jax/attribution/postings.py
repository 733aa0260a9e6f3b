"""Per-prototype posting lists: a running top-T, merged batch by batch, and CSR tables.

A posting of prototype j is an indexed position t with a_tj > 0. `single_pass` orders a
prototype's postings by a query-independent bound on how much a position can score,

  |a_tj [w . p_t - w[y_t]]| <= 2 a_tj (1 - p_t[y_t]) ||w||_inf,

so the key a_tj (1 - p_t[y_t]) ranks them for every query at once; the `prototype` method
ranks by a_tj. The target postings (one list per vocabulary token y, the positions that
predict y) feed single_pass's unembedding term, whose size for a position is at most
||W r_q|| ||o_q|| times ||r_t|| ||o_t|| (W = diag(f + lambda)^-1), and
||r_t||^2 = (1 - p_t[y_t])^2 + sum_{v != y_t} p_t[v]^2 <= 2 (1 - p_t[y_t])^2, so they are
ranked by (1 - p_t[y_t]) ||o_t||. Ties go to the smaller token id, so the result never
depends on how the positions were batched or how often the build was interrupted.
"""

from __future__ import annotations

import numpy as np


def _grouped_top(proto, key, token, act, limit: int | None):
  """Entries sorted by (proto, key desc, token), each proto's first `limit` kept; + ranks."""
  order = np.lexsort((token, -key, proto))
  proto, key, token, act = proto[order], key[order], token[order], act[order]
  starts = np.r_[0, np.nonzero(proto[1:] != proto[:-1])[0] + 1] if len(proto) else np.zeros(0,
                                                                                            int)
  counts = np.diff(np.r_[starts, len(proto)])
  rank = np.arange(len(proto)) - np.repeat(starts, counts)
  keep = rank < limit if limit is not None else np.ones(len(proto), bool)
  return proto[keep], key[keep], token[keep], act[keep], rank[keep]


class TopT:
  """For each of M prototypes the T entries of largest key: [M, T] tables, -1 token = empty."""

  def __init__(self, m: int, t: int):
    self.m, self.t = m, t
    self.key = np.zeros((m, t), np.float32)
    self.token = np.full((m, t), -1, np.int64)
    self.act = np.zeros((m, t), np.float32)

  def add(self, proto, key, token, act):
    """Merges entries (arrays of one length) into the tables."""
    keep = act > 0  # a zero activation contributes nothing to any method
    proto, key, token, act = proto[keep], key[keep], token[keep], act[keep]
    if not len(proto):
      return
    touched = np.unique(proto)
    old_token = self.token[touched].reshape(-1)
    old = old_token >= 0
    proto = np.r_[np.repeat(touched, self.t)[old], proto]
    key = np.r_[self.key[touched].reshape(-1)[old], key.astype(np.float32)]
    token = np.r_[old_token[old], token.astype(np.int64)]
    act = np.r_[self.act[touched].reshape(-1)[old], act.astype(np.float32)]
    proto, key, token, act, rank = _grouped_top(proto, key, token, act, self.t)
    self.token[touched] = -1
    self.key[touched] = 0
    self.act[touched] = 0
    self.key[proto, rank], self.token[proto, rank], self.act[proto, rank] = key, token, act

  def entries(self):
    """(proto, key, token, act) of every filled slot."""
    proto, slot = np.nonzero(self.token >= 0)
    return proto, self.key[proto, slot], self.token[proto, slot], self.act[proto, slot]

  def merge(self, other: "TopT", token_base: int) -> None:
    """Adds another process's table, its token ids shifted to global ids."""
    proto, key, token, act = other.entries()
    self.add(proto, key, token + token_base, act)

  def state(self, prefix: str) -> dict:
    return {f"{prefix}_key": self.key, f"{prefix}_token": self.token, f"{prefix}_act": self.act}

  def load(self, state, prefix: str) -> "TopT":
    self.key = np.array(state[f"{prefix}_key"])
    self.token = np.array(state[f"{prefix}_token"])
    self.act = np.array(state[f"{prefix}_act"])
    return self


class Counts:
  """Running counts of ids in [0, n) (the target tokens): same interface as TopT."""

  def __init__(self, n: int):
    self.counts = np.zeros(n, np.int64)

  def add(self, ids) -> None:
    self.counts += np.bincount(np.asarray(ids, np.int64), minlength=len(self.counts))

  def merge(self, other: "Counts", token_base: int) -> None:
    del token_base  # counts carry no token ids
    self.counts += other.counts

  def state(self, prefix: str) -> dict:
    return {f"{prefix}_counts": self.counts}

  def load(self, state, prefix: str) -> "Counts":
    self.counts = np.array(state[f"{prefix}_counts"], np.int64)
    return self


def csr(proto, key, token, act, m: int):
  """All entries as CSR lists ordered by (proto, key desc, token): offsets [M+1], token, act."""
  proto, _, token, act, _ = _grouped_top(proto, key, token, act, None)
  offsets = np.zeros(m + 1, np.int64)
  np.add.at(offsets, proto + 1, 1)
  return np.cumsum(offsets), token, act


def from_top(top: TopT):
  """A TopT's tables as CSR lists (rows already ordered)."""
  counts = (top.token >= 0).sum(1)
  offsets = np.r_[0, np.cumsum(counts)].astype(np.int64)
  filled = top.token >= 0
  return offsets, top.token[filled], top.act[filled]
