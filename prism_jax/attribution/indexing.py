"""Builds the index (format in index.py) in one streaming, sharded, resumable pass.

  manifest = build(cfg, graphdef, params, corpus_or_training_set, out_dir, attr,
                   mesh=run.mesh, step=step, decode=tokenizer.decode)   # inside `with run:`

Every token of every document is scored once (documents.py). Each process reads its share
of the documents (ordinal mod process count), runs the index step on the caller's mesh
(index_step.py: FSDP parameters, the bank on its axis) over batches of chunks, and appends
its positions to part files under <out>.partial/processes/PPPPP/. Host memory holds one
part's positions plus the per-prototype state (running top-T postings and neighbours); the
curvature sums stay on the device. Every `attr.index_part_batches` batches the build
commits: parts written, then the running state (processes' tables, process 0 the device
sums), then `progress.json` naming the committed batch count. A rerun after a kill resumes
from the last commit and gives the same index as an uninterrupted run. Process 0 then
merges the per-process tables, turns the sums into per-prototype eigendecompositions,
writes the prototype shards (each posting with a copy of its position's RECORD_FIELDS, so a
`single_pass` query reads its k + 1 lists and nothing else) and the manifest, drops the
per-position fields that only the build read (unless attr.index_keep_build_fields), and
moves the folder into place. Before that it merges each process's consecutive parts into
parts of up to MERGED_PART_TOKENS positions: `influence` and the display gather positions
part by part, so their cost grows with the number of part files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
import sys
import zipfile

import jax
import numpy as np
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from prism_jax import distributed, outputs, sharding
from prism_jax.attribution import context_match
from prism_jax.attribution import curvature as curvature_lib
from prism_jax.attribution import documents as documents_lib
from prism_jax.attribution import index_step, postings
from prism_jax.attribution.common import TrainingSet, rows_to_batch
from prism_jax.attribution.config import AttributionConfig
from prism_jax.attribution.index import (FORMAT, RECORD_FIELDS, Index, default_decode,
                                         is_index)
from prism_jax.checkpoint import model_settings
from prism_jax.config import MeshConfig
from prism_jax.errors import UserError
from prism_jax.models import lm

# Which query methods read each file (bytes_by_method); "display" = text shown to users.
# "build": read while the index is finished (the postings' copies, influence's full lists).
USED_BY = {
    "target": ["display"], "document": ["influence", "prototype"],
    "offset": ["display"], "top_indices": ["build"], "top_values": ["build"],
    "p_target": ["build"], "softmax_ids": ["build"], "softmax_probs": ["build"],
    "context": ["build"],
    "grad": ["influence"],
    "doc_ordinal": ["display"], "doc_record": ["display"], "doc_offsets": ["display"],
    "doc_tokens": ["display"],
    "posting_offsets": ["single_pass"], "posting_token": ["single_pass"],
    "posting_activation": ["single_pass"],
    **{f"posting_{field}": ["single_pass"] for field in RECORD_FIELDS},
    **{f"target_{field}": ["single_pass"] for field in RECORD_FIELDS if field != "target"},
    "target_offsets": ["single_pass"], "target_token": ["single_pass"],
    "target_counts": ["single_pass"],
    "full_offsets": ["influence"], "full_token": ["influence"], "full_activation": ["influence"],
    "neighbour_token": ["prototype"], "neighbour_activation": ["prototype"],
    "span_offsets": ["prototype"], "span_bytes": ["prototype"],
    "softmax_prior": ["single_pass"], "curvature_values": ["single_pass", "influence"],
    "curvature_vectors": ["single_pass", "influence"],
}
METHODS = ("single_pass", "prototype", "influence")
CONTENT_KNOBS = ("postings", "target_postings", "softmax_top", "neighbourhood_size",
                 "index_influence", "index_keep_build_fields", "index_dtype", "batch_size",
                 "index_part_batches",
                 "index_examples", "index_seed", "span_tokens", "shard_prototypes", "curvature")


# Positions per merged part (host memory while merging: one merged part's fields).
MERGED_PART_TOKENS = 1 << 24


def id_dtype(count: int):
  """The smallest integer dtype holding ids in [0, count): uint16 where it fits."""
  return np.uint16 if count <= 2**16 else np.int32


# ------------------------------------------------------------------------------------------
# Files


def save_npy(path: epath.Path, array) -> int:
  """Writes one .npy whole (temporary sibling, then a rename); returns its bytes."""
  buffer = io.BytesIO()
  np.save(buffer, np.ascontiguousarray(array))
  outputs.write_bytes(path, buffer.getvalue())
  return len(buffer.getvalue())


def load_npz(path: epath.Path) -> dict:
  with np.load(io.BytesIO(path.read_bytes())) as f:
    return {k: f[k] for k in f.files}


def _remove(path: epath.Path):
  if path.exists():
    if path.is_dir():
      path.rmtree()
    else:
      path.unlink()


# ------------------------------------------------------------------------------------------
# The pass


@dataclasses.dataclass
class _Setup:
  cfg: object
  attr: AttributionConfig
  mesh: object
  rows: int                 # chunks per step on this process
  process_index: int
  process_count: int
  dtype: np.dtype           # activations and probabilities as stored
  vocab_ids: type
  proto_ids: type


def _sync(name: str, count: int):
  if count > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _any_process(flag: bool, count: int) -> bool:
  if count == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def _to_host(tree, setup: _Setup, local: bool):
  """Device arrays -> numpy: this process's rows (`local`) or the whole array."""
  if setup.process_count == 1:
    return jax.tree.map(np.asarray, jax.device_get(tree))
  from jax.experimental import multihost_utils
  if local:
    spec = sharding.logical_to_spec(("batch",))
    return jax.tree.map(np.asarray, multihost_utils.global_array_to_host_local_array(
        tree, setup.mesh, P(*spec)))
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


class _Part:
  """One part's positions and documents, buffered on the host until written."""

  def __init__(self):
    self.fields = {}
    self.documents = []
    self.num_tokens = 0

  def add(self, records: dict, docs):
    for name, value in records.items():
      self.fields.setdefault(name, []).append(value)
    self.num_tokens += len(records["target"])
    self.documents.extend(docs)

  def write(self, folder: epath.Path, setup: _Setup) -> dict:
    files = {}
    for name, values in self.fields.items():
      files[name] = np.concatenate(values)
    tokens = [d.tokens for d in self.documents]
    files["doc_ordinal"] = np.array([d.ordinal for d in self.documents], np.int64)
    files["doc_record"] = np.array([d.record_id for d in self.documents], np.int64)
    files["doc_offsets"] = np.r_[0, np.cumsum([len(t) for t in tokens])].astype(np.int64)
    files["doc_tokens"] = (np.concatenate(tokens) if tokens else np.zeros(0)).astype(
        setup.vocab_ids)
    written = {name: save_npy(folder / f"{name}.npy", array) for name, array in files.items()}
    return {"num_tokens": self.num_tokens, "num_documents": len(self.documents),
            "bytes": written}


def _records(host: dict, batch: dict, chunks: documents_lib.ChunkBatch, first_token: int,
             setup: _Setup) -> dict:
  """The valid positions of one batch, in (row, position) order, as stored."""
  row, pos = np.nonzero(batch["loss_mask"] > 0)
  pick = lambda name: host[name][row, pos]
  out = {"target": batch["targets"][row, pos].astype(setup.vocab_ids),
         "document": chunks.document[row].astype(np.int32),
         "offset": (chunks.start[row] + pos).astype(np.int32),
         "top_indices": pick("top_indices").astype(setup.proto_ids),
         "top_values": pick("top_values").astype(setup.dtype),
         "softmax_ids": pick("softmax_ids").astype(setup.vocab_ids),
         "softmax_probs": pick("softmax_probs").astype(setup.dtype),
         "p_target": pick("p_target").astype(setup.dtype),
         "context": context_match.fingerprints(batch["inputs"])[row, pos]}
  if "grad" in host:
    out["grad"] = pick("grad").astype(np.float32)
  out["_token"] = first_token + np.arange(len(row), dtype=np.int64)
  out["_mix_norm"] = pick("mix_norm").astype(np.float32)  # a bound only: not stored
  return out


def _bound(top_values, p_target):
  """a_tj (1 - p_t[y_t]) per posting [n, k] (see postings.py)."""
  return (np.asarray(top_values, np.float32)
          * (1.0 - np.asarray(p_target, np.float32))[:, None])


def _target_bound(p_target, mix_norm):
  """(1 - p_t[y_t]) ||o_t|| per position: the target postings' key (see postings.py)."""
  return (1.0 - np.asarray(p_target, np.float32)) * np.asarray(mix_norm, np.float32)


def _add_to_tables(records: dict, tables: dict, k: int):
  token = np.repeat(records["_token"], k)
  proto = records["top_indices"].reshape(-1).astype(np.int64)
  act = records["top_values"].reshape(-1).astype(np.float32)
  if "postings" in tables:
    bound = _bound(records["top_values"], records["p_target"]).reshape(-1)
    tables["postings"].add(proto, bound, token, act)
  tables["neighbours"].add(proto, act, token, act)
  target = records["target"].astype(np.int64)
  bound = _target_bound(records["p_target"], records["_mix_norm"])
  tables["targets"].add(target, bound, records["_token"], bound)
  tables["target_counts"].add(target)


def _fingerprint(cfg, attr: AttributionConfig, step, saved_ns, setup: _Setup,
                 num_documents: int) -> dict:
  build = {"format": FORMAT, "step": step, "model_settings": model_settings(cfg),
           "attr": {k: getattr(attr, k) for k in CONTENT_KNOBS}, "rows": setup.rows,
           "process_count": setup.process_count, "num_documents": num_documents,
           "seq_len": cfg.data.seq_len}
  if saved_ns is not None:  # the checkpoint itself, not only its step (a run trained again)
    build["checkpoint_saved_ns"] = saved_ns
  return json.loads(json.dumps(build))


# What a build writes at the top of <out>.partial (and, while it is finished, the index's
# own entries); a folder there holding anything else is not removed.
_BUILD_NAME = re.compile(r"progress\.json|processes|prototypes|targets|manifest\.json"
                         r"|sums_\d{9}\.npz|\..+\.tmp\d+|\.shared_check_[0-9a-f]+")


def _is_build_folder(work: epath.Path) -> bool:
  return work.is_dir() and all(_BUILD_NAME.fullmatch(p.name) for p in work.iterdir())


def _check_build_folder(work: epath.Path, out_dir) -> None:
  if work.exists() and not _is_build_folder(work):
    raise UserError(f"{work} is where --index {out_dir} is built, and it holds something "
                    "that is not an index build (nothing was changed): move it, or give "
                    "another --index")


def _resume_point(work: epath.Path, fingerprint: dict) -> dict | None:
  """The committed progress of an earlier build of the same index, else None."""
  try:
    progress = json.loads((work / "progress.json").read_text())
  except (OSError, ValueError):
    return None
  return progress if progress.get("fingerprint") == fingerprint else None


def _finished(out_dir, fingerprint: dict) -> dict | None:
  """The manifest of a finished build of exactly this index at `out_dir`, with every file
  it lists whole (a damaged one is built again), else None."""
  folder = epath.Path(out_dir)
  try:
    manifest = json.loads((folder / "manifest.json").read_text())
    if not isinstance(manifest, dict) or manifest.get("build") != fingerprint:
      return None
    whole = all((folder / name).stat().length == entry["bytes"]
                for name, entry in manifest["files"].items())
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    return None
  return manifest if whole else None


def build(cfg, graphdef, params, train, out_dir, attr: AttributionConfig, *,
          decode=default_decode, devices=None, step: int | None = None,
          saved_ns: int | None = None, mesh=None,
          stop_after_batches: int | None = None) -> dict | None:
  """Indexes `train` (a TrainingSet: one document per row; or a documents.Corpus) into
  `out_dir`; returns the manifest. With `mesh` (the run's, its rules entered by the
  caller) the pass runs there on `params` as they are laid out; without, on a
  data-parallel mesh of `devices` (default: this process's) with `params` replicated.
  `stop_after_batches` stops after that many batches of this call without finishing (a
  kill, for tests): the next call resumes from the last commit. An index already built
  from the same checkpoint (`step`, and `saved_ns`: when it was committed), settings and
  documents is kept: its manifest comes back with `up_to_date` set."""
  if cfg.model.head != "prism":
    raise UserError(f"{cfg.name} has a dense head: the prototype index needs a PRISM model")
  vocab, m = cfg.model.vocab_size, cfg.prototypes.num_prototypes
  if attr.softmax_top > vocab:
    raise UserError(f"attr.softmax_top={attr.softmax_top} exceeds the vocabulary "
                    f"({vocab} tokens)")
  if attr.index_dtype not in ("float16", "float32"):
    raise UserError(f"attr.index_dtype={attr.index_dtype!r} must be float16 or float32")
  if attr.curvature not in ("none", "blocks", "shared"):
    raise UserError(f"attr.curvature={attr.curvature!r} must be none, blocks or shared")
  if attr.index_influence and attr.curvature == "none":
    attr = dataclasses.replace(attr, curvature="blocks")  # influence solves with each G_j
  outputs.check_folder(out_dir, "prototype index", is_index, "--index")  # before the pass
  work = epath.Path(str(out_dir).rstrip("/") + ".partial")
  _check_build_folder(work, out_dir)  # a stale build there is removed: only a build
  corpus = (documents_lib.from_training_set(train) if isinstance(train, TrainingSet)
            else train)
  own_mesh = mesh is None
  if own_mesh:
    mesh = sharding.make_mesh(MeshConfig(data=-1, fsdp=1, model=1),
                              list(devices or jax.local_devices()))
    params = jax.device_put(params, NamedSharding(mesh, P()))
  count = jax.process_count() if not own_mesh else 1
  setup = _Setup(cfg, attr, mesh, attr.batch_size * mesh.devices.size // count,
                 jax.process_index() if not own_mesh else 0, count,
                 np.dtype(attr.index_dtype), id_dtype(vocab), id_dtype(m))
  context = contextlib.ExitStack()
  if own_mesh:
    context.enter_context(jax.set_mesh(mesh))
    context.enter_context(sharding.use_rules(MeshConfig().rules))
  distributed.check_shared_workdir(str(work), "--index")  # process 0 merges every part
  fingerprint = _fingerprint(cfg, attr, step, saved_ns, setup, corpus.num_documents)
  finished = _finished(out_dir, fingerprint)
  if finished is not None:  # the same step, settings and documents: hours at scale, saved
    context.close()
    return {**finished, "up_to_date": True}
  with context:
    e_VxD = np.asarray(_to_host(lm.unembedding(params), setup, local=False), np.float64)
    basis = curvature_lib.shared_basis(e_VxD) if attr.curvature == "shared" else None
    done = _pass(graphdef, params, corpus, work, fingerprint, setup, stop_after_batches, basis)
    if not done:
      return None
  manifest = None
  if setup.process_index == 0:
    manifest = _finish(cfg, attr, work, fingerprint, setup, e_VxD, basis, step, saved_ns,
                       decode, corpus.num_documents)
    outputs.replace_folder(work, out_dir, "prototype index", is_index, "--index")
  _sync("prism_index_done", setup.process_count)
  return manifest if manifest is not None else Index(str(out_dir)).manifest


def _pass(graphdef, params, corpus, work: epath.Path, fingerprint: dict, setup: _Setup,
          stop_after_batches, basis) -> bool:
  """The streaming pass; True when every batch is committed."""
  cfg, attr = setup.cfg, setup.attr
  m, k, d = cfg.prototypes.num_prototypes, cfg.prototypes.top_k, cfg.model.d_model
  proc = work / "processes" / f"{setup.process_index:05d}"
  progress = _resume_point(work, fingerprint)
  tables = _tables(attr, m, cfg.model.vocab_size)
  resumed = (_committed_state(work, proc, progress, setup.process_index, tables)
             if progress is not None else None)
  if _any_process(progress is not None and resumed is None, setup.process_count):
    print(f"the half-built index at {work} is damaged (a committed file is missing or cut "
          "short): building it again from the start", file=sys.stderr)
    progress, tables = None, _tables(attr, m, cfg.model.vocab_size)
  if progress is None and setup.process_index == 0:
    _remove(work)  # a stale, different or damaged build: start afresh
  _sync("prism_index_start", setup.process_count)
  batches_done, num_tokens, parts = 0, 0, []
  if progress is not None:
    batches_done = progress["batches_done"]
    mine = progress["processes"][setup.process_index]
    num_tokens, parts = mine["num_tokens"], mine["parts"]
    sums = index_step.put_sums(setup.mesh, resumed)
  else:
    sums = index_step.zero_sums(setup.mesh, m, cfg.model.vocab_size, d, attr.curvature)
  if progress is not None and progress.get("finished"):
    return True
  fn = jax.jit(index_step.step(graphdef, attr.softmax_top, attr.index_influence),
               donate_argnums=(2,))
  batch_sharding = NamedSharding(setup.mesh, sharding.logical_to_spec(("batch", "length")))
  stream = documents_lib.batches(
      documents_lib.for_process(corpus.open(), setup.process_index, setup.process_count),
      cfg.data.seq_len, setup.rows)
  part, b, ran = _Part(), 0, 0
  while True:
    chunks = next(stream, None)
    if not _any_process(chunks is not None, setup.process_count):
      break
    if chunks is None:  # this process is out of documents; the others are not
      chunks = documents_lib.ChunkBatch(np.zeros((setup.rows, cfg.data.seq_len + 1), np.int32),
                                        np.zeros(setup.rows, np.int64),
                                        np.full(setup.rows, -1, np.int64),
                                        np.zeros(setup.rows, np.int64), [], 0)
    b += 1
    if b <= batches_done:
      continue  # committed before the interruption
    batch = rows_to_batch(chunks.tokens, chunks.lengths)
    placed = {key: jax.make_array_from_process_local_data(batch_sharding, batch[key])
              for key in batch}
    out, sums = fn(params, placed, sums, basis)
    records = _records(_to_host(out, setup, local=True), batch, chunks, num_tokens, setup)
    num_tokens += len(records["target"])
    _add_to_tables(records, tables, k)
    records.pop("_token")
    records.pop("_mix_norm")
    part.add(records, chunks.documents)
    ran += 1
    if b % attr.index_part_batches == 0:
      parts = _commit(work, proc, part, parts, tables, sums, b, num_tokens, fingerprint,
                      setup, finished=False)
      part = _Part()
    if stop_after_batches is not None and ran >= stop_after_batches:
      return False  # as if killed: whatever was not committed is lost
  _commit(work, proc, part, parts, tables, sums, b, num_tokens, fingerprint, setup,
          finished=True)
  return True


def _committed_state(work: epath.Path, proc: epath.Path, progress: dict, process: int,
                     tables: dict):
  """Loads this process's committed tables into `tables` and returns the committed device
  sums (process 0's file; every process reads it), or None when a committed file is gone or
  cut short: files are written whole, so only damage from outside does that."""
  batches = progress["batches_done"]
  try:
    for part in progress["processes"][process]["parts"]:
      for name, size in part.get("bytes", {}).items():  # (older builds: not recorded)
        if (work / part["path"] / f"{name}.npy").stat().length != size:
          return None
    state = load_npz(proc / f"state_{batches:09d}.npz")
    for name, table in tables.items():
      table.load(state, name)
    return load_npz(work / f"sums_{batches:09d}.npz")
  except (OSError, ValueError, KeyError, IndexError, zipfile.BadZipFile):
    return None


def _commit(work, proc, part: _Part, parts: list, tables: dict, sums, batches: int,
            num_tokens: int, fingerprint: dict, setup: _Setup, finished: bool) -> list:
  """Writes the part and the running state, then names them in progress.json."""
  if part.num_tokens or part.documents:
    rel = f"processes/{setup.process_index:05d}/parts/{len(parts):06d}"
    parts = parts + [{"path": rel, **part.write(work / rel, setup)}]
  state = {}
  for name, table in tables.items():
    state.update(table.state(name))
  outputs.write_npz(proc / f"state_{batches:09d}.npz", state)
  host_sums = _to_host(sums, setup, local=False)
  outputs.write_json(proc / f"progress_{batches:09d}.json",
                     {"num_tokens": num_tokens, "parts": parts})
  _sync(f"prism_index_written_{batches}", setup.process_count)
  if setup.process_index == 0:  # every process's files are written: commit them together
    processes = [json.loads((work / "processes" / f"{i:05d}" / f"progress_{batches:09d}.json"
                             ).read_text()) for i in range(setup.process_count)]
    outputs.write_npz(work / f"sums_{batches:09d}.npz", host_sums)
    outputs.write_json(work / "progress.json", {
        "fingerprint": fingerprint, "batches_done": batches, "processes": processes,
        "finished": finished})
  _sync(f"prism_index_commit_{batches}", setup.process_count)
  for old in list(proc.glob("state_*.npz")) + list(proc.glob("progress_*.json")):
    if old.name not in (f"state_{batches:09d}.npz", f"progress_{batches:09d}.json"):
      _remove(old)  # earlier commits are superseded
  if setup.process_index == 0:
    for old in work.glob("sums_*.npz"):
      if old.name != f"sums_{batches:09d}.npz":
        _remove(old)
  return parts


# ------------------------------------------------------------------------------------------
# Finishing (process 0)


def _merge_parts(work: epath.Path, process: int, parts: list, max_tokens: int) -> list:
  """One process's committed parts, consecutive ones concatenated into parts of at most
  `max_tokens` positions (a part already larger stays alone); returns the new part list.
  Writes new folders only (merged_NNNNNN): the committed parts stay until the index is done,
  so a kill here leaves a build that finishes again."""
  groups, tokens = [], 0
  for part in parts:
    if not groups or tokens + part["num_tokens"] > max_tokens:
      groups.append([])
      tokens = 0
    groups[-1].append(part)
    tokens += part["num_tokens"]
  if len(groups) == len(parts):
    return parts
  merged = []
  for g, group in enumerate(groups):
    rel = f"processes/{process:05d}/parts/merged_{g:06d}"
    names = sorted(f.name[:-4] for f in (work / group[0]["path"]).glob("*.npy"))
    for name in names:
      arrays = [np.load(io.BytesIO((work / part["path"] / f"{name}.npy").read_bytes()))
                for part in group]
      if name == "doc_offsets":  # each part's offsets start at 0: shift them onto the last
        shifted, at = [np.zeros(1, np.int64)], 0
        for offsets in arrays:
          shifted.append(offsets[1:] + at)
          at += int(offsets[-1])
        arrays = shifted
      save_npy(work / rel / f"{name}.npy", np.concatenate(arrays))
    merged.append({"path": rel, "num_tokens": sum(p["num_tokens"] for p in group),
                   "num_documents": sum(p["num_documents"] for p in group)})
  return merged


def _finish(cfg, attr, work: epath.Path, fingerprint: dict, setup: _Setup, e_VxD, basis,
            step, saved_ns, decode, num_documents: int) -> dict:
  progress = json.loads((work / "progress.json").read_text())
  batches = progress["batches_done"]
  committed = progress["processes"]
  processes = [{**p, "parts": [{k: v for k, v in part.items() if k != "bytes"}  # in "files"
                               for part in _merge_parts(work, i, p["parts"],
                                                        MERGED_PART_TOKENS)]}
               for i, p in enumerate(committed)]
  bases = np.r_[0, np.cumsum([p["num_tokens"] for p in processes])].astype(np.int64)
  num_tokens = int(bases[-1])
  if num_tokens == 0:
    raise UserError("the indexed training documents have no scored positions")
  m, d = cfg.prototypes.num_prototypes, cfg.model.d_model
  manifest = {
      "format": FORMAT, "experiment": cfg.name, "step": step,
      "checkpoint_saved_ns": saved_ns, "head": cfg.model.head,
      "num_prototypes": m, "top_k": cfg.prototypes.top_k, "d_model": d,
      "vocab_size": cfg.model.vocab_size, "seq_len": cfg.data.seq_len,
      "num_examples": num_documents, "num_tokens": num_tokens,
      "postings": attr.postings, "target_postings": attr.target_postings,
      "softmax_top": attr.softmax_top,
      "neighbourhood_size": attr.neighbourhood_size, "span_tokens": attr.span_tokens,
      "index_dtype": attr.index_dtype, "has_influence": attr.index_influence,
      "curvature": attr.curvature,
      "processes": [{"path": f"processes/{i:05d}", "first_token": int(bases[i]), **p}
                    for i, p in enumerate(processes)],
      "shards": [], "model_settings": model_settings(cfg), "build": fingerprint}
  reader = Index.from_manifest(work, manifest)
  tables = _merged_tables(work, processes, bases, batches, attr, m, cfg.model.vocab_size)
  full = None
  if attr.postings == 0 or attr.index_influence:
    full = _all_postings(reader, m)
  sums = load_npz(work / f"sums_{batches:09d}.npz")
  token_dtype = np.uint32 if num_tokens < 2**32 else np.int64  # posting ids, compact
  files = {}

  def save(rel, array, used_by):
    files[rel] = {"bytes": save_npy(work / rel, array), "shape": list(np.shape(array)),
                  "dtype": str(np.asarray(array).dtype), "used_by": used_by}

  for s, start in enumerate(range(0, m, attr.shard_prototypes)):
    stop = min(start + attr.shard_prototypes, m)
    rel = f"prototypes/{s:05d}"
    lists = {"posting": _shard_csr(tables.get("postings"), full, start, stop)}
    if attr.postings and attr.index_influence:
      lists["full"] = _shard_csr(None, full, start, stop)
    for prefix, (offsets, token, act) in lists.items():
      save(f"{rel}/{prefix}_offsets.npy", offsets, USED_BY[f"{prefix}_offsets"])
      save(f"{rel}/{prefix}_token.npy", token.astype(token_dtype), USED_BY[f"{prefix}_token"])
      save(f"{rel}/{prefix}_activation.npy", act.astype(setup.dtype),
           USED_BY[f"{prefix}_activation"])
    for field, array in _records_of(reader, lists["posting"][1], RECORD_FIELDS).items():
      save(f"{rel}/posting_{field}.npy", array, USED_BY[f"posting_{field}"])
    neighbours = tables["neighbours"]
    token = neighbours.token[start:stop]
    save(f"{rel}/neighbour_token.npy", token, USED_BY["neighbour_token"])
    save(f"{rel}/neighbour_activation.npy", neighbours.act[start:stop],
         USED_BY["neighbour_activation"])
    spans = [span_text_of(reader, int(t), attr.span_tokens, decode) if t >= 0 else b""
             for t in token.reshape(-1)]
    save(f"{rel}/span_offsets.npy", np.r_[0, np.cumsum([len(x) for x in spans])].astype(
        np.int64), USED_BY["span_offsets"])
    save(f"{rel}/span_bytes.npy", np.frombuffer(b"".join(spans), np.uint8),
         USED_BY["span_bytes"])
    manifest["shards"].append({"start": start, "stop": stop, "path": rel})
    if attr.curvature == "none":
      continue
    pi = np.asarray(sums["pi"][start:stop], np.float64)
    prior = pi / np.maximum(pi.sum(-1, keepdims=True), 1e-30)
    save(f"{rel}/softmax_prior.npy", prior.astype(setup.dtype), USED_BY["softmax_prior"])
    if basis is None:
      blocks = curvature_lib.blocks(sums["pi"][start:stop], sums["s"][start:stop], e_VxD,
                                    num_tokens)
      values, vectors = curvature_lib.eigen(blocks)
      save(f"{rel}/curvature_vectors.npy", vectors.astype(np.float32),
           USED_BY["curvature_vectors"])
    else:
      values = curvature_lib.shared_values(sums["pi"][start:stop], sums["sq"][start:stop],
                                           e_VxD, basis, num_tokens)
    save(f"{rel}/curvature_values.npy", values.astype(np.float32), USED_BY["curvature_values"])
  offsets, token, _ = postings.from_top(tables["targets"])
  save("targets/target_offsets.npy", offsets, USED_BY["target_offsets"])
  save("targets/target_token.npy", token.astype(token_dtype), USED_BY["target_token"])
  fields = [f for f in RECORD_FIELDS if f != "target"]  # a list's target is its token y
  for field, array in _records_of(reader, token, fields).items():
    save(f"targets/target_{field}.npy", array, USED_BY[f"target_{field}"])
  save("targets/target_counts.npy", tables["target_counts"].counts, USED_BY["target_counts"])
  if basis is not None:
    save("prototypes/curvature_basis.npy", basis.astype(np.float32), USED_BY["curvature_vectors"])
  for old in list(work.glob("sums_*.npz")) + [work / "progress.json"]:
    _remove(old)
  if not attr.index_keep_build_fields:  # copied into the postings above
    for proc in manifest["processes"]:
      for part in proc["parts"]:
        for name, used_by in USED_BY.items():
          if used_by == ["build"]:
            _remove(work / part["path"] / f"{name}.npy")
  for proc in manifest["processes"]:
    for part in proc["parts"]:
      for f in sorted((work / part["path"]).glob("*.npy")):
        name = f.name[:-4]
        array = np.load(str(f), mmap_mode="r") if "://" not in str(f) else None
        files[f"{part['path']}/{f.name}"] = {
            "bytes": f.stat().length, "used_by": USED_BY[name],
            "shape": list(array.shape) if array is not None else None,
            "dtype": str(array.dtype) if array is not None else None}
  for proc in work.glob("processes/*"):
    for old in list(proc.glob("state_*.npz")) + list(proc.glob("progress_*.json")):
      _remove(old)
  kept = {part["path"] for p in processes for part in p["parts"]}
  for p in committed:  # the parts that were merged (progress.json, which named them, is gone)
    for part in p["parts"]:
      if part["path"] not in kept:
        _remove(work / part["path"])
  manifest["files"] = files
  manifest["bytes_total"] = sum(f["bytes"] for f in files.values())
  manifest["bytes_by_method"] = {
      method: sum(f["bytes"] for f in files.values() if method in f["used_by"])
      for method in METHODS}
  manifest["bytes_per_token"] = {
      method: manifest["bytes_by_method"][method] / num_tokens for method in METHODS}
  manifest["bytes_per_token"]["all"] = manifest["bytes_total"] / num_tokens
  outputs.write_json(work / "manifest.json", manifest)
  return manifest


def span_text_of(reader: Index, token: int, context: int, decode) -> bytes:
  return reader.position_span(token, context, decode).encode("utf-8")


def _tables(attr, m: int, vocab: int) -> dict:
  """A process's running state: top-T tables per prototype and per target, target counts."""
  tables = {"neighbours": postings.TopT(m, attr.neighbourhood_size),
            "targets": postings.TopT(vocab, attr.target_postings),
            "target_counts": postings.Counts(vocab)}
  if attr.postings:
    tables["postings"] = postings.TopT(m, attr.postings)
  return tables


def _merged_tables(work, processes, bases, batches: int, attr, m: int, vocab: int) -> dict:
  """The processes' running tables merged, their token ids made global."""
  merged = _tables(attr, m, vocab)
  for i in range(len(processes)):
    state = load_npz(work / "processes" / f"{i:05d}" / f"state_{batches:09d}.npz")
    own = _tables(attr, m, vocab)
    for name, table in merged.items():
      table.merge(own[name].load(state, name), bases[i])
  return merged


def _records_of(reader: Index, token: np.ndarray, fields) -> dict[str, np.ndarray]:
  """Each listed position's fields, copied in list order (the posting records)."""
  token = np.asarray(token, np.int64)
  return {field: reader.gather(field, token) for field in fields}


def _all_postings(reader: Index, m: int):
  """Every posting from the parts: (proto, bound, token, act), O(N k) host memory."""
  n = reader.num_tokens
  ids = np.arange(n)
  values = reader.gather("top_values", ids).astype(np.float32)
  k = values.shape[1]
  proto = reader.gather("top_indices", ids).reshape(-1).astype(np.int64)
  bound = _bound(values, reader.gather("p_target", ids)).reshape(-1)
  token = np.repeat(ids, k)
  act = values.reshape(-1)
  keep = act > 0
  return proto[keep], bound[keep], token[keep], act[keep]


def _shard_csr(table, full, start: int, stop: int):
  """CSR lists of prototypes [start, stop): from a running top-T table or from all postings."""
  if table is not None:
    return postings.from_top(table, start, stop)
  proto, key, token, act = full
  sel = (proto >= start) & (proto < stop)
  return postings.csr(proto[sel] - start, key[sel], token[sel], act[sel], stop - start)
