"""The prototype index over every token the model trained on: format and reader.

Built by one streaming pass (`build`, in indexing.py), read memory-mapped. Format
`prism-index/5`, a directory:

  manifest.json         format, model, step, sizes, the processes and their parts (global
                        token ids run through processes, then parts, in order), the
                        prototype shards, every file (bytes, shape, dtype, methods reading it)
  processes/PPPPP/parts/<part>/      one part of process P's positions and documents
                        (merged_NNNNNN once finished: consecutive committed parts joined)
    target.npy          [n] uint16|int32       y_t, the predicted token
    document.npy        [n] int32              the example (document ordinal) of the position
    offset.npy          [n] int32              offset in the document (predicts tokens[o+1])
    top_indices.npy     [n, k] uint16|int32    active prototypes
    top_values.npy      [n, k] float16|32      their activations
    softmax_ids.npy     [n, r] uint16|int32    the r most probable tokens under the model
    softmax_probs.npy   [n, r] float16|32      their probabilities
    context.npy         [n] uint32             fingerprint of the last 16 input tokens the
                                               model read (context_match.py)
    grad.npy            [n, D] float32         g_t (only with attr.index_influence)
    doc_ordinal.npy, doc_record.npy [d] int64  documents whose first chunk is in the part,
    doc_offsets.npy [d+1] int64, doc_tokens.npy [*] uint16|int32   and their tokens
  prototypes/SSSSS/     prototypes [start, stop) of shard S
    posting_offsets.npy [S+1] int64            CSR posting lists of `single_pass`: each
    posting_token.npy   [P] uint32|int64       prototype's top-T positions (T =
    posting_activation.npy [P] float16|32      attr.postings, 0 = all) by a_tj (1 - p_t[y_t])
    posting_<field>.npy [P, ...]               each posting's own copy of its position's
                                               RECORD_FIELDS (target, document, top_indices,
                                               top_values, softmax_ids, softmax_probs,
                                               context), so a
                                               query reads k contiguous blocks, not P random
                                               rows of the parts
    full_offsets/full_token/full_activation    every posting (influence; only when T > 0)
    neighbour_token.npy [S, Tn] int64          `prototype`: top-Tn positions by activation,
    neighbour_activation.npy [S, Tn] float32   -1 padded; Tn = attr.neighbourhood_size
    span_offsets.npy, span_bytes.npy           their UTF-8 text spans (context, [[token]])
    (the next three only with attr.curvature=blocks|shared: the values term's)
    softmax_prior.npy   [S, V] float16|32      Pi_j / sum(Pi_j): the prototype's average
                                               softmax (single_pass's tail estimate)
    curvature_values.npy  [S, D] float32       G_j = Q diag(lam) Q^T (curvature.py)
    curvature_vectors.npy [S, D, D] float32    (attr.curvature=blocks)
  targets/target_offsets.npy [V+1] int64    CSR lists per vocabulary token y: the top-T'
  targets/target_token.npy [P'] uint32|int64  positions predicting y by (1 - p_t[y]) ||o_t||
                                               (T' = attr.target_postings; single_pass)
  targets/target_<field>.npy [P', ...]       the same copies for the target postings
                                               (every field but target, which is y itself)
  targets/target_counts.npy [V] int64        how many positions predict each token
  prototypes/curvature_basis.npy [D, D] float32  the shared basis (attr.curvature=shared,
                                               then curvature_values is diag(Q^T G_j Q))

Every array opens with np.load(mmap_mode='r') (local paths; a bucket path is read whole),
so a query touches only the rows it reads. `single_pass` reads only the posting copies: its
read is O(k T + T') contiguous rows whatever N is (the parts are read by the other methods
and for display). Paths go through etils.epath.
"""

from __future__ import annotations

import io
import json
import sys
from typing import Callable, Sequence

import jax
import numpy as np
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from prism_jax import sharding
from prism_jax.attribution import curvature as curvature_lib
from prism_jax.attribution import index_step
from prism_jax.attribution.common import TrainingSet
from prism_jax.checkpoint import other_commit, saved_time, settings_difference
from prism_jax.config import MeshConfig
from prism_jax.errors import UserError

FORMAT = "prism-index/5"
PART_FIELDS = ("target", "document", "offset", "top_indices", "top_values", "softmax_ids",
               "softmax_probs", "context", "grad")
# What single_pass scores a position from; copied into each posting (module docstring).
RECORD_FIELDS = ("target", "document", "top_indices", "top_values", "softmax_ids",
                 "softmax_probs", "context")


def default_decode(ids: Sequence[int]) -> str:
  return " ".join(str(int(i)) for i in ids)


def span_text(row: np.ndarray, position: int, context: int, decode: Callable) -> str:
  """The `context` tokens up to `position`, then the predicted token in [[ ]]."""
  start = max(0, position + 1 - context)
  context_ids = [int(t) for t in row[start:position + 1]]
  return f"{decode(context_ids)} [[{token_text(decode, context_ids, int(row[position + 1]))}]]"


def token_text(decode: Callable, context_ids, token: int) -> str:
  """A token as text. A piece that decodes to nothing visible on its own (sentencepiece's
  bare space '▁', a newline) is shown quoted, as it reads after its context: ' ' or '\n'."""
  text = decode([token])
  if text.strip():
    return text
  before, both = decode(list(context_ids)), decode(list(context_ids) + [token])
  return repr(both[len(before):] if both.startswith(before) else text)


# ------------------------------------------------------------------------------------------
# The per-batch function on a plain data-parallel mesh (tests, aot, small in-memory builds)


def _token_stats(graphdef, top_r: int = 8, with_grad: bool = True):
  """fn(params, batch) -> per-position records (index_step.token_records)."""
  return index_step.token_records(graphdef, top_r, with_grad)


def _placed(graphdef, params, devices, batch_size: int, top_r: int = 8):
  """(per-batch records function, global rows) on a data-parallel mesh of `devices`,
  `batch_size` rows per device: every device runs the same local program."""
  devices = list(devices or jax.devices())
  mesh = sharding.make_mesh(MeshConfig(data=-1, fsdp=1, model=1), devices)
  replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  params = jax.device_put(params, replicated)
  fn = jax.jit(_token_stats(graphdef, top_r), in_shardings=(replicated, rows))

  def run(batch):
    with jax.set_mesh(mesh), sharding.use_rules(MeshConfig().rules):
      return jax.device_get(fn(params, {k: jax.device_put(v, rows) for k, v in batch.items()}))

  return run, batch_size * len(devices)


# ------------------------------------------------------------------------------------------
# Opening


# The top-level entries of a built index (a damaged one is recognised by holding nothing else).
_INDEX_ENTRIES = frozenset({"manifest.json", "processes", "prototypes", "targets"})


def is_index(path) -> bool:
  """True when `path` holds a prototype index: its manifest names the format, or (a damaged
  index: a manifest that does not parse) the folder holds an index's own entries and nothing
  else, so that it can be rebuilt in place without losing anything that is not the index's."""
  folder = epath.Path(path)
  manifest = folder / "manifest.json"
  try:
    return str(json.loads(manifest.read_text()).get("format", "")).startswith("prism-index/")
  except (ValueError, UnicodeDecodeError, AttributeError):
    try:
      return {p.name for p in folder.iterdir()} <= _INDEX_ENTRIES
    except OSError:
      return False
  except OSError:
    return False


def open_for(path: str, step: int, settings: dict, allow_mismatch: bool = False,
             saved_ns: int | None = None) -> "Index":
  """The index at `path`, refused (or, with `allow_mismatch`, warned about) when it was built
  from another checkpoint (step, or `saved_ns`: when it was committed) or other model
  settings than the parameters in use."""
  index = Index(path)
  why = check_source(index.manifest, step, settings, saved_ns)
  if why and not allow_mismatch:
    raise UserError(f"the index at {path} {why}: rebuild it (make index) or pass "
                    "--allow-index-mismatch")
  if why:
    print(f"warning: the index at {path} {why}; scores describe that model", file=sys.stderr)
  return index


def check_source(manifest: dict, step: int, settings: dict, saved_ns: int | None = None
                 ) -> str | None:
  """Why an index does not belong to the model at `step`, committed at `saved_ns` (None when
  it does; an index or checkpoint that records no commit time is judged by its step)."""
  if manifest.get("step") != step:
    return f"was built from checkpoint step {manifest.get('step')}, not {step}"
  built_from = manifest.get("checkpoint_saved_ns")
  if other_commit(built_from, saved_ns):
    return (f"was built from another checkpoint of step {step} (committed "
            f"{saved_time(built_from)}; the one there now: {saved_time(saved_ns)}, "
            "a run trained again?)")
  difference = settings_difference(manifest.get("model_settings", settings), settings)
  return f"was built with {difference}" if difference else None


def load_array(path: epath.Path) -> np.ndarray:
  """A .npy file, memory-mapped when local, read whole from a bucket."""
  if "://" not in str(path):
    return np.load(str(path), mmap_mode="r")
  return np.load(io.BytesIO(path.read_bytes()))


def _build_identity(path: epath.Path):
  """Which build a local index folder holds now: its manifest's mtime and size (a rebuild
  swaps in a folder whose manifest was written as that build finished, seconds to hours
  after the one a reader opened). None for a bucket (a request per file read)."""
  if "://" in str(path):
    return None
  try:
    stat = (path / "manifest.json").stat()
  except OSError:
    return ()
  return stat.mtime, stat.length


class PartArray:
  """One per-position field over all parts, indexed by global token id without concatenating."""

  def __init__(self, index: "Index", field: str):
    self.index, self.field = index, field

  def __len__(self) -> int:
    return self.index.num_tokens

  def __getitem__(self, ids):
    if isinstance(ids, (int, np.integer)):
      return self.index.gather(self.field, np.array([ids]))[0]
    if isinstance(ids, slice):
      ids = np.arange(len(self))[ids]
    return self.index.gather(self.field, np.asarray(ids))

  def __array__(self, dtype=None, copy=None):
    out = self.index.gather(self.field, np.arange(len(self)))
    return out if dtype is None else out.astype(dtype)

  @property
  def shape(self):
    first = self.index.gather(self.field, np.array([0]))
    return (len(self),) + first.shape[1:]


class Index:
  """Memory-mapped view of an index directory."""

  LEGACY = {"tokens/target.npy": "target", "tokens/example.npy": "document",
            "tokens/position.npy": "offset", "tokens/top_indices.npy": "top_indices",
            "tokens/top_values.npy": "top_values", "tokens/grad.npy": "grad"}

  def __init__(self, path: str):
    self.path = epath.Path(path)
    manifest_path = self.path / "manifest.json"
    if not manifest_path.exists():
      raise UserError(f"no prototype index at {path} (expected {manifest_path}); build it "
                      "with `make index` / python -m prism_jax.index")
    try:
      self.manifest = json.loads(manifest_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
      raise UserError(f"the index at {path} is damaged: manifest.json does not parse "
                      f"({type(e).__name__}: {e}); rebuild it (make index)") from None
    if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
      found = self.manifest.get("format") if isinstance(self.manifest, dict) else None
      raise UserError(f"{path} holds index format {found!r}, "
                      f"this code reads {FORMAT!r}; rebuild the index (make index)")
    self._cache: dict = {}
    self._parts = None
    self._documents = None
    self._identity = _build_identity(self.path)

  @classmethod
  def from_manifest(cls, path, manifest: dict) -> "Index":
    """A reader over a folder whose manifest is not written yet (the build's own use)."""
    index = cls.__new__(cls)
    index.path, index.manifest = epath.Path(path), manifest
    index._cache, index._parts, index._documents = {}, None, None
    index._identity = None
    return index

  # --- per-position arrays, spread over parts ---------------------------------------------

  @property
  def num_tokens(self) -> int:
    return int(self.manifest["num_tokens"])

  def _part_table(self):
    if self._parts is None:
      paths, starts = [], [0]
      for proc in self.manifest["processes"]:
        for part in proc["parts"]:
          paths.append(part["path"])
          starts.append(starts[-1] + part["num_tokens"])
      self._parts = (paths, np.asarray(starts, np.int64))
    return self._parts

  def array(self, rel: str):
    """A file of the index by relative path; the per-position fields also by their
    format-1 names (tokens/target.npy, tokens/example.npy, tokens/position.npy, ...)."""
    if rel in self.LEGACY:
      return PartArray(self, self.LEGACY[rel])
    if rel not in self._cache:
      # Files open as they are first read: after a rebuild they would be the new build's,
      # paired with the old manifest and the files read before it.
      if self._identity is not None and _build_identity(self.path) != self._identity:
        raise UserError(f"the index at {self.path} was rebuilt while it was open; open it "
                        "again")
      try:
        self._cache[rel] = load_array(self.path / rel)
      except (OSError, ValueError, EOFError) as e:  # missing, truncated, not an .npy
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise UserError(f"the index at {self.path} is damaged: {rel}: {reason}; rebuild it "
                        "(make index)") from None
    return self._cache[rel]

  def gather(self, field: str, ids: np.ndarray) -> np.ndarray:
    """field[ids] for global token ids (any order), reading only the parts they fall in."""
    paths, starts = self._part_table()
    ids = np.asarray(ids, np.int64)
    # Sorted reads: each part's rows in file order (callers often pass sorted ids already).
    order = (np.argsort(ids, kind="stable") if np.any(ids[1:] < ids[:-1])
             else np.arange(len(ids)))
    ids_sorted = ids[order]
    bounds = np.searchsorted(ids_sorted, starts)  # [parts + 1]
    out = None
    for p in np.nonzero(bounds[1:] > bounds[:-1])[0]:
      lo, hi = bounds[p], bounds[p + 1]
      rows = np.asarray(self.array(f"{paths[p]}/{field}.npy")[ids_sorted[lo:hi] - starts[p]])
      if out is None:
        out = np.empty((len(ids),) + rows.shape[1:], rows.dtype)
      out[order[lo:hi]] = rows
    if out is None:  # no ids: an empty array of the field's row shape
      first = self.array(f"{paths[0]}/{field}.npy")
      out = np.empty((0,) + first.shape[1:], first.dtype)
    return out

  # --- documents (the examples) -----------------------------------------------------------

  @property
  def num_examples(self) -> int:
    return int(self.manifest["num_examples"])

  def _document_table(self):
    """(part of each document ordinal, its row in that part); read on first use."""
    if self._documents is None:
      paths, _ = self._part_table()
      where = np.full((self.num_examples, 2), -1, np.int64)
      for p, path in enumerate(paths):
        ordinals = np.asarray(self.array(f"{path}/doc_ordinal.npy"))
        where[ordinals, 0], where[ordinals, 1] = p, np.arange(len(ordinals))
      self._documents = where
    return self._documents

  def document(self, e: int) -> np.ndarray:
    """Document e's tokens ([bos] ... [eos]) as int32."""
    p, row = self._document_table()[e]
    path = self._part_table()[0][p]
    offsets = self.array(f"{path}/doc_offsets.npy")
    return np.asarray(self.array(f"{path}/doc_tokens.npy")[offsets[row]:offsets[row + 1]],
                      np.int32)

  def record_id(self, e: int) -> int:
    p, row = self._document_table()[e]
    return int(self.array(f"{self._part_table()[0][p]}/doc_record.npy")[row])

  def position_span(self, token: int, context: int, decode: Callable) -> str:
    """Text of scored position `token`: its context, then [[the predicted token]]."""
    doc = self.document(int(self.gather("document", np.array([token]))[0]))
    return span_text(doc, int(self.gather("offset", np.array([token]))[0]), context, decode)

  def training_set(self) -> TrainingSet:
    """The documents as padded rows [E, longest + 1] (small indexes: display, tests)."""
    docs = [self.document(e) for e in range(self.num_examples)]
    width = max([len(d) for d in docs] + [2])
    rows = np.zeros((len(docs), width), np.int32)
    for e, d in enumerate(docs):
      rows[e, :len(d)] = d
    return TrainingSet(rows, np.array([len(d) for d in docs], np.int32),
                       np.array([self.record_id(e) for e in range(len(docs))], np.int64))

  # --- per-prototype arrays ---------------------------------------------------------------

  def _shard(self, j: int) -> tuple[str, int]:
    shards = self.manifest["shards"]
    size = shards[0]["stop"] - shards[0]["start"]
    shard = shards[j // size]
    return shard["path"], j - shard["start"]

  def _list(self, folder: str, prefix: str, row: int) -> tuple[int, int]:
    """(start, stop) of CSR list `row` of the files <folder>/<prefix>_*.npy."""
    offsets = self.array(f"{folder}/{prefix}_offsets.npy")
    return int(offsets[row]), int(offsets[row + 1])

  def _csr(self, j: int, prefix: str):
    rel, local = self._shard(j)
    lo, hi = self._list(rel, prefix, local)
    return (np.asarray(self.array(f"{rel}/{prefix}_token.npy")[lo:hi], np.int64),
            np.asarray(self.array(f"{rel}/{prefix}_activation.npy")[lo:hi], np.float64))

  def postings(self, j: int) -> tuple[np.ndarray, np.ndarray]:
    """`single_pass`'s postings of prototype j: (token ids, activations), best bound first."""
    return self._csr(j, "posting")

  def all_postings(self, j: int) -> tuple[np.ndarray, np.ndarray]:
    """Every indexed position activating prototype j (influence)."""
    return self._csr(j, "full" if self.manifest["postings"] else "posting")

  def neighbours(self, j: int) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, activations) of prototype j's neighbourhood, padding removed."""
    rel, local = self._shard(j)
    tok = np.asarray(self.array(f"{rel}/neighbour_token.npy")[local])
    act = np.asarray(self.array(f"{rel}/neighbour_activation.npy")[local])
    keep = tok >= 0
    return tok[keep], act[keep]

  def span(self, j: int, rank: int) -> str:
    rel, local = self._shard(j)
    offsets = self.array(f"{rel}/span_offsets.npy")
    i = local * self.manifest["neighbourhood_size"] + rank
    return bytes(self.array(f"{rel}/span_bytes.npy")[offsets[i]:offsets[i + 1]]).decode("utf-8")

  def curvature_eigen(self, j: int) -> tuple[np.ndarray, np.ndarray]:
    """(eigenvalues [D], eigenvectors [D, D]) of G_j; with attr.curvature=shared, the
    diagonal of Q^T G_j Q and the shared basis Q."""
    self.require_curvature()
    rel, local = self._shard(j)
    values = np.asarray(self.array(f"{rel}/curvature_values.npy")[local])
    if self.manifest.get("curvature") == "shared":
      return values, np.asarray(self.array("prototypes/curvature_basis.npy"))
    return values, np.asarray(self.array(f"{rel}/curvature_vectors.npy")[local])

  def posting_records(self, j: int) -> dict[str, np.ndarray]:
    """Prototype j's postings with their positions' RECORD_FIELDS: {"token", "activation",
    field: [P_j, ...]}, best bound first; one contiguous read per file."""
    rel, local = self._shard(j)
    lo, hi = self._list(rel, "posting", local)
    out = {"token": np.asarray(self.array(f"{rel}/posting_token.npy")[lo:hi], np.int64),
           "activation": np.asarray(self.array(f"{rel}/posting_activation.npy")[lo:hi])}
    for field in RECORD_FIELDS:
      out[field] = np.asarray(self.array(f"{rel}/posting_{field}.npy")[lo:hi])
    return out

  def target_posting_records(self, y: int) -> dict[str, np.ndarray]:
    """The target postings of token y with their positions' RECORD_FIELDS (as
    posting_records; "target" is y throughout)."""
    lo, hi = self._list("targets", "target", y)
    out = {"token": np.asarray(self.array("targets/target_token.npy")[lo:hi], np.int64)}
    for field in RECORD_FIELDS:
      if field != "target":
        out[field] = np.asarray(self.array(f"targets/target_{field}.npy")[lo:hi])
    out["target"] = np.full(hi - lo, y, np.int64)
    return out

  def target_postings(self, y: int) -> np.ndarray:
    """Token ids of the indexed positions predicting token y, best bound first (top T')."""
    lo, hi = self._list("targets", "target", y)
    return np.asarray(self.array("targets/target_token.npy")[lo:hi], np.int64)

  def target_frequency(self) -> np.ndarray:
    """f [V]: the share of indexed positions predicting each token (float64)."""
    counts = np.asarray(self.array("targets/target_counts.npy"), np.float64)
    return counts / max(counts.sum(), 1.0)

  def softmax_prior(self, j: int) -> np.ndarray:
    """Prototype j's average softmax, Pi_j / sum(Pi_j) [V] (weights a_tj^2)."""
    self.require_curvature()
    rel, local = self._shard(j)
    return np.asarray(self.array(f"{rel}/softmax_prior.npy")[local], np.float64)

  def curvature(self, j: int) -> np.ndarray:
    """G_j [D, D] (undamped, float64)."""
    return curvature_lib.matrix(*self.curvature_eigen(j))

  def method_bytes(self, method: str) -> int:
    return int(self.manifest["bytes_by_method"][method])

  def require_curvature(self):
    if self.manifest.get("curvature") == "none":
      raise UserError(f"the index at {self.path} was built with attr.curvature=none (the "
                      "default method needs none); the values term and --method influence "
                      "need it: rebuild with attr.curvature=blocks or shared")

  def require_influence(self):
    if not self.manifest["has_influence"]:
      raise UserError(f"the index at {self.path} was built with attr.index_influence=false; "
                      "rebuild it to use --method influence")
