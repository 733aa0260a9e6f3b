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


def _ranks(proto_sorted):
  """Each entry's place within its proto's run, for protos in non-decreasing order."""
  if not len(proto_sorted):
    return np.zeros(0, np.int64)
  starts = np.r_[0, np.nonzero(proto_sorted[1:] != proto_sorted[:-1])[0] + 1]
  return np.arange(len(proto_sorted)) - np.repeat(starts, np.diff(np.r_[starts,
                                                                         len(proto_sorted)]))


def _grouped_top(proto, key, token, act, limit: int | None):
  """Entries sorted by (proto, key desc, token), each proto's first `limit` kept; + ranks."""
  order = np.lexsort((token, -key, proto))
  proto, key, token, act = proto[order], key[order], token[order], act[order]
  rank = _ranks(proto)
  keep = rank < limit if limit is not None else np.ones(len(proto), bool)
  return proto[keep], key[keep], token[keep], act[keep], rank[keep]


def _order_code(proto, key):
  """One uint64 per entry whose ascending order is (proto, key descending): the proto in the
  high 32 bits, the float32 key's bits mapped so that larger keys give smaller codes."""
  bits = (np.asarray(key, np.float32) + np.float32(0.0)).view(np.uint32)  # -0.0 -> +0.0
  ascending = np.where(bits >> 31, ~bits, bits | np.uint32(1 << 31))  # order of the floats
  return (np.asarray(proto, np.uint64) << np.uint64(32)) | (~ascending).astype(np.uint64)


class TopT:
  """For each of M prototypes the T entries of largest key: [M, T] tables, -1 token = empty.

  Ties go to the smaller token. A streaming build adds entries whose tokens follow every
  stored one; those wait in a buffer (already cut to the entries that can still enter
  their row) and are merged into the sorted tables once the buffer holds half a table, so a
  batch costs its own sort, not the [M, T] table's (at T = 4,096 postings per prototype the
  whole-table sort per batch made the build quadratic-looking once the tables filled).
  Reading `key`, `token` or `act` merges the buffer first.
  """

  def __init__(self, m: int, t: int):
    self.m, self.t = m, t
    self._key = np.zeros((m, t), np.float32)
    self._token = np.full((m, t), -1, np.int64)
    self._act = np.zeros((m, t), np.float32)
    self._pending: list[tuple] = []
    self._pending_count = 0
    self._last_token = -1  # the largest token stored or buffered

  @property
  def key(self):
    self._flush()
    return self._key

  @property
  def token(self):
    self._flush()
    return self._token

  @property
  def act(self):
    self._flush()
    return self._act

  def add(self, proto, key, token, act):
    """Merges entries (arrays of one length) into the tables."""
    keep = act > 0  # a zero activation contributes nothing to any method
    proto, token, act = (np.asarray(proto[keep], np.int64), np.asarray(token[keep], np.int64),
                         np.asarray(act[keep], np.float32))
    key = np.nan_to_num(np.asarray(key[keep], np.float32), nan=-np.inf)  # NaN ranks last
    if not len(proto):
      return
    if token[0] <= self._last_token or np.any(token[1:] < token[:-1]):
      self._flush()  # not a stream: merge everything by one sort
      self._merge_sorting(proto, key, token, act)
      self._last_token = max(self._last_token, int(token.max()))
      return
    # A full row's last slot beats every later token of equal or smaller key.
    last_key, full = self._key[proto, -1], self._token[proto, -1] >= 0
    can_enter = ~full | (key > last_key)
    if can_enter.any():
      self._pending.append((proto[can_enter], key[can_enter], token[can_enter],
                            act[can_enter]))
      self._pending_count += int(can_enter.sum())
    self._last_token = int(token[-1])
    if self._pending_count >= self.m * self.t // 2:
      self._flush()

  def _flush(self):
    """Merges the buffered stream into the tables: the buffer alone is sorted; the tables'
    rows are in (key desc, token) order already and every buffered token is larger."""
    if not self._pending:
      return
    proto, key, token, act = (np.concatenate(x) for x in zip(*self._pending))
    self._pending, self._pending_count = [], 0
    new_code = _order_code(proto, key)
    order = np.argsort(new_code, kind="stable")  # stable: equal codes stay in token order
    new_code, proto, key, token, act = (x[order] for x in (new_code, proto, key, token, act))
    old_proto, slot = np.nonzero(self._token >= 0)
    old_key = self._key[old_proto, slot]
    # Equal (proto, key): the stored entry has the smaller token, so it goes first.
    at = np.searchsorted(_order_code(old_proto, old_key), new_code, side="right")
    is_new = np.zeros(len(old_proto) + len(proto), bool)
    is_new[at + np.arange(len(at))] = True

    def merged(old, new):
      out = np.empty(len(is_new), new.dtype)
      out[is_new], out[~is_new] = new, old
      return out

    self._store(merged(old_proto, proto), merged(old_key, key),
                merged(self._token[old_proto, slot], token),
                merged(self._act[old_proto, slot], act), np.unique(proto))

  def _merge_sorting(self, proto, key, token, act):
    touched = np.unique(proto)
    old_token = self._token[touched].reshape(-1)
    old = old_token >= 0
    proto = np.r_[np.repeat(touched, self.t)[old], proto]
    key = np.r_[self._key[touched].reshape(-1)[old], key]
    token = np.r_[old_token[old], token]
    act = np.r_[self._act[touched].reshape(-1)[old], act]
    proto, key, token, act, _ = _grouped_top(proto, key, token, act, None)
    self._store(proto, key, token, act, touched)

  def _store(self, proto, key, token, act, touched):
    """Rewrites the rows `touched` from entries in (proto, key desc, token) order that hold
    every stored entry of those rows."""
    rank = _ranks(proto)
    keep = rank < self.t
    proto, rank = proto[keep], rank[keep]
    self._token[touched] = -1
    self._key[touched] = 0
    self._act[touched] = 0
    self._key[proto, rank], self._token[proto, rank], self._act[proto, rank] = (
        key[keep], token[keep], act[keep])

  def entries(self):
    """(proto, key, token, act) of every filled slot."""
    proto, slot = np.nonzero(self.token >= 0)
    return proto, self._key[proto, slot], self._token[proto, slot], self._act[proto, slot]

  def merge(self, other: "TopT", token_base: int) -> None:
    """Adds another process's table, its token ids shifted to global ids."""
    proto, key, token, act = other.entries()
    self.add(proto, key, token + token_base, act)

  def state(self, prefix: str) -> dict:
    return {f"{prefix}_key": self.key, f"{prefix}_token": self.token, f"{prefix}_act": self.act}

  def load(self, state, prefix: str) -> "TopT":
    self._pending, self._pending_count = [], 0
    self._key = np.array(state[f"{prefix}_key"])
    self._token = np.array(state[f"{prefix}_token"])
    self._act = np.array(state[f"{prefix}_act"])
    self._last_token = int(self._token.max(initial=-1))
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


def from_top(top: TopT, start: int = 0, stop: int | None = None):
  """Rows [start, stop) of a TopT's tables as CSR lists (rows already ordered)."""
  token, act = top.token[start:stop], top.act[start:stop]
  filled = token >= 0
  offsets = np.r_[0, np.cumsum(filled.sum(1))].astype(np.int64)
  return offsets, token[filled], act[filled]
