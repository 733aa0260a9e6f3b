"""The prototype index: one pass over training data, written as memory-mappable shards.

On-disk format (`FORMAT`), a directory:

  manifest.json                 format, model, sizes, shard table, every file with its
                                bytes, shape, dtype and the methods that read it
  examples/rows.npy             [E, L+1] int32  token rows of the indexed examples
  examples/lengths.npy          [E] int32       real tokens per row
  examples/example_ids.npy      [E] int64       record ids in the training split
  tokens/example.npy            [N] int32       row of each scored position (token id = index)
  tokens/position.npy           [N] int32       position in the row (predicts rows[e, pos+1])
  tokens/target.npy             [N] int32       the predicted token
  tokens/top_indices.npy        [N, k] int32    active prototypes
  tokens/top_values.npy         [N, k] float32  their activations
  tokens/grad.npy               [N, D] float32  g_t = E^T (softmax - onehot(target))  (influence)
  shards/SSSSS/                 prototypes [start, stop) of shard S:
    neighbour_token.npy         [S, T] int64    top activating positions (token ids, -1 pad)
    neighbour_activation.npy    [S, T] float32  their activations, descending
    span_offsets.npy            [S*T+1] int64   UTF-8 text span of each neighbour in
    span_bytes.npy              [*] uint8       span_bytes (context, then [[token]])
    posting_offsets.npy         [S+1] int64     CSR lists: every position activating the
    posting_token.npy           [P] int64       prototype (token ids) ...            (influence)
    posting_activation.npy      [P] float32     ... and its activation             (influence)
    curvature.npy               [S, D, D] f32   undamped Gauss-Newton block of U_j   (influence)

Shards are independent (each can be written by its own worker and read alone); every
array is opened with np.load(mmap_mode='r'), so a query touches only the pages it reads.

The Gauss-Newton block of prototype j's value vector U_j, averaged over the N positions:
  G_j = 1/N sum_t a_tj^2 E^T (diag(p_t) - p_t p_t^T) E
      = 1/N [E^T diag(Pi_j) E - sum_t a_tj^2 m_t m_t^T],  Pi_j = sum_t a_tj^2 p_t, m_t = E^T p_t
Pi is accumulated per batch ([M, V]); m_t = g_t + E_{y_t} is recovered from the stored g_t.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from prism_jax import outputs, sharding
from prism_jax.attribution.common import TrainingSet, chunks
from prism_jax.attribution.config import AttributionConfig
from prism_jax.checkpoint import model_settings, settings_difference
from prism_jax.config import ExperimentConfig, MeshConfig
from prism_jax.errors import UserError
from prism_jax.models import lm

FORMAT = "prism-index/1"
PROTOTYPE_FILES = ("examples/", "tokens/example", "tokens/position", "tokens/target",
                   "neighbour_", "span_")


def default_decode(ids: Sequence[int]) -> str:
  return " ".join(str(int(i)) for i in ids)


def span_text(row: np.ndarray, position: int, context: int, decode: Callable) -> str:
  """The `context` tokens up to `position`, then the predicted token in [[ ]]."""
  start = max(0, position + 1 - context)
  before = decode([int(t) for t in row[start:position + 1]])
  return f"{before} [[{decode([int(row[position + 1])])}]]"


# ------------------------------------------------------------------------------------------
# The pass over the data


def _token_stats(graphdef):
  """Per position: top-k activations and g_t = E^T (p_t - e_{y_t}); and p_t itself."""

  def fn(params, batch):
    out = lm.forward(graphdef, params, batch)
    protos = out.prototypes
    e_VxD = lm.unembedding(params).astype(jnp.float32)
    p_BxLxV = jax.nn.softmax(out.logits, axis=-1)
    g_BxLxD = jnp.einsum("blv,vd->bld", p_BxLxV, e_VxD) - jnp.take(e_VxD, batch["targets"], 0)
    return protos.top_values, protos.top_indices, g_BxLxD, p_BxLxV

  return fn


def _placed(graphdef, params, devices, batch_size: int):
  """(jitted per-batch function, global batch) on a data-parallel mesh of `devices`.

  `batch_size` rows go to each device, so every device runs the same local program
  whatever the device count, and the index is bit-identical on 1 or 8 devices.
  """
  devices = list(devices or jax.devices())
  mesh = sharding.make_mesh(MeshConfig(data=-1, fsdp=1, model=1), devices)
  batch_size = batch_size * len(devices)
  replicated = NamedSharding(mesh, P())
  rows = NamedSharding(mesh, P("data"))
  params = jax.device_put(params, replicated)
  fn = jax.jit(_token_stats(graphdef), in_shardings=(replicated, rows))

  def run(batch):
    with jax.set_mesh(mesh), sharding.use_rules(MeshConfig().rules):
      return jax.device_get(fn(params, {k: jax.device_put(v, rows) for k, v in batch.items()}))

  return run, batch_size


def build(cfg: ExperimentConfig, graphdef, params, train: TrainingSet, out_dir: str,
          attr: AttributionConfig, *, decode: Callable = default_decode, devices=None,
          step: int | None = None) -> dict:
  """One pass over `train`; writes the index to `out_dir` and returns its manifest."""
  if cfg.model.head != "prism":
    raise UserError(f"{cfg.name} has a dense head: the prototype index needs a PRISM model")
  outputs.check_folder(out_dir, "prototype index", is_index, "--index")  # before the pass
  run, batch_size = _placed(graphdef, params, devices, attr.batch_size)
  m = cfg.prototypes.num_prototypes
  e_VxD = np.asarray(jax.device_get(lm.unembedding(params)), np.float64)
  pi_MxV = np.zeros((m, e_VxD.shape[0]), np.float64)
  parts = {name: [] for name in ("example", "position", "target", "top_indices", "top_values",
                                 "grad")}
  for index in chunks(train.num_examples, batch_size):
    batch = train.batch(index, pad_to=batch_size)
    top_values, top_indices, g, p = run(batch)
    valid = batch["loss_mask"][:len(index)] > 0
    ex, pos = np.nonzero(valid)
    vals, idx = top_values[ex, pos], top_indices[ex, pos]
    parts["example"].append(index[ex].astype(np.int32))
    parts["position"].append(pos.astype(np.int32))
    parts["target"].append(batch["targets"][ex, pos].astype(np.int32))
    parts["top_indices"].append(idx.astype(np.int32))
    parts["top_values"].append(vals.astype(np.float32))
    if attr.index_influence:
      parts["grad"].append(g[ex, pos].astype(np.float32))
      w_NxM = np.zeros((len(ex), m), np.float64)
      np.put_along_axis(w_NxM, idx, vals.astype(np.float64) ** 2, axis=1)
      p_NxV = p[ex, pos].astype(np.float64)
      for row in np.unique(ex):  # row by row: the sum's order never depends on batching
        sel = ex == row
        pi_MxV += w_NxM[sel].T @ p_NxV[sel]
  tokens = {name: (np.concatenate(v) if v else None) for name, v in parts.items()}
  num_tokens = 0 if tokens["example"] is None else len(tokens["example"])
  if num_tokens == 0:
    raise UserError("the indexed training examples have no scored positions")
  return _write(cfg, attr, train, tokens, pi_MxV, e_VxD, out_dir, decode, step, num_tokens)


def _postings(top_indices_NxK, top_values_NxK, m: int):
  """Positions sorted by (prototype, activation descending, token): CSR offsets [M+1]."""
  n, k = top_indices_NxK.shape
  proto = top_indices_NxK.reshape(-1)
  act = top_values_NxK.reshape(-1)
  token = np.repeat(np.arange(n, dtype=np.int64), k)
  keep = act > 0  # a zero activation contributes nothing to any method
  proto, act, token = proto[keep], act[keep], token[keep]
  order = np.lexsort((token, -act, proto))
  offsets = np.zeros(m + 1, np.int64)
  np.add.at(offsets, proto + 1, 1)
  return np.cumsum(offsets), token[order], act[order].astype(np.float32)


def _write(cfg, attr, train, tokens, pi_MxV, e_VxD, out_dir, decode, step, num_tokens) -> dict:
  m, d = cfg.prototypes.num_prototypes, cfg.model.d_model
  tmp = out_dir.rstrip("/") + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  files = {}

  def save(rel, array, used_by):
    path = os.path.join(tmp, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.save(path, np.ascontiguousarray(array))
    files[rel] = {"bytes": os.path.getsize(path), "shape": list(np.shape(array)),
                  "dtype": str(np.asarray(array).dtype), "used_by": used_by}

  both = ["prototype", "influence"]
  save("examples/rows.npy", train.rows, both)
  save("examples/lengths.npy", train.lengths, both)
  save("examples/example_ids.npy", train.example_ids, both)
  for name in ("example", "position", "target"):
    save(f"tokens/{name}.npy", tokens[name], both)
  save("tokens/top_indices.npy", tokens["top_indices"], ["influence"])
  save("tokens/top_values.npy", tokens["top_values"], ["influence"])
  offsets, post_token, post_act = _postings(tokens["top_indices"], tokens["top_values"], m)
  if attr.index_influence:
    save("tokens/grad.npy", tokens["grad"], ["influence"])
    # m_t = g_t + E_{y_t}: the expected unembedding under the model, per position.
    m_NxD = tokens["grad"].astype(np.float64) + e_VxD[tokens["target"]]
  shards = []
  size, t_keep = attr.shard_prototypes, attr.neighbourhood_size
  for shard, start in enumerate(range(0, m, size)):
    stop = min(start + size, m)
    rel = f"shards/{shard:05d}"
    neighbour_token = np.full((stop - start, t_keep), -1, np.int64)
    neighbour_act = np.zeros((stop - start, t_keep), np.float32)
    spans = []
    for j in range(start, stop):
      lo, hi = offsets[j], min(offsets[j + 1], offsets[j] + t_keep)
      neighbour_token[j - start, :hi - lo] = post_token[lo:hi]
      neighbour_act[j - start, :hi - lo] = post_act[lo:hi]
      for r in range(t_keep):
        if r < hi - lo:
          tok = post_token[lo + r]
          row = train.rows[tokens["example"][tok]]
          spans.append(span_text(row, int(tokens["position"][tok]), attr.span_tokens,
                                 decode).encode("utf-8"))
        else:
          spans.append(b"")
    span_offsets = np.zeros(len(spans) + 1, np.int64)
    span_offsets[1:] = np.cumsum([len(s) for s in spans])
    save(f"{rel}/neighbour_token.npy", neighbour_token, both)
    save(f"{rel}/neighbour_activation.npy", neighbour_act, both)
    save(f"{rel}/span_offsets.npy", span_offsets, ["prototype"])
    save(f"{rel}/span_bytes.npy", np.frombuffer(b"".join(spans), np.uint8), ["prototype"])
    if attr.index_influence:
      lo, hi = offsets[start], offsets[stop]
      save(f"{rel}/posting_offsets.npy", offsets[start:stop + 1] - lo, ["influence"])
      save(f"{rel}/posting_token.npy", post_token[lo:hi], ["influence"])
      save(f"{rel}/posting_activation.npy", post_act[lo:hi], ["influence"])
      curvature = np.zeros((stop - start, d, d), np.float32)
      for j in range(start, stop):
        a, b = offsets[j], offsets[j + 1]
        weighted = m_NxD[post_token[a:b]] * post_act[a:b, None].astype(np.float64)
        block = (e_VxD.T * pi_MxV[j]) @ e_VxD - weighted.T @ weighted
        curvature[j - start] = block / num_tokens
      save(f"{rel}/curvature.npy", curvature, ["influence"])
    shards.append({"start": start, "stop": stop, "path": rel})
  manifest = {
      "format": FORMAT, "experiment": cfg.name, "step": step, "head": cfg.model.head,
      "num_prototypes": m, "top_k": cfg.prototypes.top_k, "d_model": d,
      "vocab_size": cfg.model.vocab_size, "seq_len": train.seq_len,
      "num_examples": train.num_examples, "num_tokens": num_tokens,
      "neighbourhood_size": t_keep, "span_tokens": attr.span_tokens,
      "has_influence": attr.index_influence, "shards": shards, "files": files,
      "model_settings": model_settings(cfg),
  }
  manifest["bytes_total"] = sum(f["bytes"] for f in files.values())
  manifest["bytes_by_method"] = {
      method: sum(f["bytes"] for f in files.values() if method in f["used_by"])
      for method in both}
  with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=1)
  manifest["bytes_total"] += os.path.getsize(os.path.join(tmp, "manifest.json"))
  with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=1)
  # Replaces only an earlier index (recognised by its manifest), never another folder.
  outputs.replace_folder(tmp, out_dir, "prototype index", is_index, "--index")
  return manifest


def is_index(path) -> bool:
  """True when `path` holds a prototype index (its manifest names the format)."""
  manifest = epath.Path(path) / "manifest.json"
  try:
    return str(json.loads(manifest.read_text()).get("format", "")).startswith("prism-index/")
  except (OSError, ValueError, AttributeError):
    return False


def open_for(path: str, step: int, settings: dict, allow_mismatch: bool = False) -> "Index":
  """The index at `path`, refused (or, with `allow_mismatch`, warned about) when it was built
  from another checkpoint step or other model settings than the parameters in use."""
  index = Index(path)
  why = check_source(index.manifest, step, settings)
  if why and not allow_mismatch:
    raise UserError(f"the index at {path} {why}: rebuild it (make index) or pass "
                    "--allow-index-mismatch")
  if why:
    print(f"warning: the index at {path} {why}; scores describe that model", file=sys.stderr)
  return index


def check_source(manifest: dict, step: int, settings: dict) -> str | None:
  """Why an index does not belong to the model at `step` (None when it does)."""
  if manifest.get("step") != step:
    return f"was built from checkpoint step {manifest.get('step')}, not {step}"
  difference = settings_difference(manifest.get("model_settings", settings), settings)
  return f"was built with {difference}" if difference else None


# ------------------------------------------------------------------------------------------
# Reading


class Index:
  """Memory-mapped view of an index directory."""

  def __init__(self, path: str):
    manifest_path = os.path.join(path, "manifest.json")
    if not os.path.exists(manifest_path):
      raise UserError(f"no prototype index at {path} (expected {manifest_path}); build it "
                      "with `make index` / python -m prism_jax.index")
    with open(manifest_path, encoding="utf-8") as f:
      self.manifest = json.load(f)
    if self.manifest.get("format") != FORMAT:
      raise UserError(f"{path} holds index format {self.manifest.get('format')!r}, "
                      f"this code reads {FORMAT!r}; rebuild the index")
    self.path = path
    self._cache = {}
    self.shard_size = self.manifest["shards"][0]["stop"] - self.manifest["shards"][0]["start"]

  def array(self, rel: str) -> np.ndarray:
    if rel not in self._cache:
      self._cache[rel] = np.load(os.path.join(self.path, rel), mmap_mode="r")
    return self._cache[rel]

  def _shard(self, j: int) -> tuple[str, int]:
    shard = self.manifest["shards"][j // self.shard_size]
    return shard["path"], j - shard["start"]

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

  def postings(self, j: int) -> tuple[np.ndarray, np.ndarray]:
    """Every indexed position activating prototype j: (token ids, activations)."""
    rel, local = self._shard(j)
    offsets = self.array(f"{rel}/posting_offsets.npy")
    lo, hi = offsets[local], offsets[local + 1]
    return (np.asarray(self.array(f"{rel}/posting_token.npy")[lo:hi]),
            np.asarray(self.array(f"{rel}/posting_activation.npy")[lo:hi]))

  def curvature(self, j: int) -> np.ndarray:
    rel, local = self._shard(j)
    return np.asarray(self.array(f"{rel}/curvature.npy")[local])

  def training_set(self) -> TrainingSet:
    return TrainingSet(np.asarray(self.array("examples/rows.npy")),
                       np.asarray(self.array("examples/lengths.npy")),
                       np.asarray(self.array("examples/example_ids.npy")))

  def method_bytes(self, method: str) -> int:
    return int(self.manifest["bytes_by_method"][method])

  def require_influence(self):
    if not self.manifest["has_influence"]:
      raise UserError(f"the index at {self.path} was built with attr.index_influence=false; "
                      "rebuild it to use --method influence")
