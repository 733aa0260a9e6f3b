"""`single_pass` and the streaming index over whole documents (prism-index/5).

Exactness: with every posting kept and the full softmax stored, `single_pass` equals
`influence` (which reads stored g_t). The index covers every target of every document
exactly once, is the same on the run's sharded mesh, and resumes after a kill.
"""

import dataclasses
import json

import chex
import jax
import numpy as np
import pytest

from prism_jax import sharding
from prism_jax.attribution import common, documents, index as index_lib, influence
from prism_jax.attribution import indexing, postings, prototype, run as run_lib
from prism_jax.attribution import single_pass
from prism_jax.attribution.config import AttributionConfig, apply_overrides
from prism_jax.config import ConfigError, MeshConfig
from prism_jax.errors import UserError
from prism_jax.models import lm
from prism_jax.step import abstract_params
from tests.synthetic import ROUND_ONE_HEAD, tiny_config

SMALL = ["model.vocab_size=32", "model.d_model=16", "model.d_ff=32", "model.num_layers=1",
         "model.num_heads=2", "prototypes.num_prototypes=8", "prototypes.top_k=2",
         "data.seq_len=8"]
EXACT = dict(postings=0, softmax_top=32, index_dtype="float32")


def _corpus(lengths, vocab, seed=0) -> documents.Corpus:
  rng = np.random.default_rng(seed)
  docs = [rng.integers(4, vocab, n).astype(np.int32) for n in lengths]
  return documents.Corpus(len(docs), lambda: (documents.Document(i, 100 + i, d)
                                              for i, d in enumerate(docs)))


def _forward(graphdef, params, batch):
  """lm.forward, jitted per graphdef (the reference loops call it once per chunk)."""
  return jax.jit(lm.forward, static_argnums=0)(graphdef, params, batch)


def _values(damping, tail="prototype"):
  """single_pass restricted to the values term: the one `influence` computes (without the
  same-text weight, which `influence` does not have)."""
  return single_pass.Settings("values", damping=damping, tail=tail, context_match=0.0)


def _docs(corpus):
  return [d.tokens for d in corpus.open()]


def _build(tmp_path, cfg, params, corpus, name="index", devices=None, **attr):
  attr = AttributionConfig(**{"batch_size": 2, "shard_prototypes": 3, "neighbourhood_size": 4,
                              "index_part_batches": 2, "index_influence": True,
                              "curvature": "blocks", **attr})
  out = str(tmp_path / name)
  graphdef, _ = lm.abstract_model(cfg)
  indexing.build(cfg, graphdef, params, corpus, out, attr,
                  devices=devices or jax.devices()[:1])
  return index_lib.Index(out)


@pytest.fixture(scope="module")
def small():
  cfg = tiny_config(*SMALL)
  _, params = lm.init(cfg, 0)
  # Documents shorter than, equal to and several times longer than a chunk (L + 1 = 9).
  return cfg, params, _corpus([5, 9, 20, 2, 1, 17, 30], cfg.model.vocab_size)


def _queries(corpus, count=6):
  out = []
  for doc in _docs(corpus):
    if len(doc) > 7:
      out.append(common.Query(tuple(int(t) for t in doc[1:6]), int(doc[6])))
  rng = np.random.default_rng(3)
  out += [common.Query(tuple(int(t) for t in rng.integers(4, 32, 4)), int(rng.integers(4, 32)))
          for _ in range(count - len(out))]
  return out


def test_every_target_of_every_document_is_scored_once(small, tmp_path):
  cfg, params, corpus = small
  index = _build(tmp_path, cfg, params, corpus, **EXACT)
  docs = _docs(corpus)
  assert index.num_tokens == sum(max(len(d) - 1, 0) for d in docs)
  assert index.num_examples == len(docs)
  doc = np.asarray(index.array("tokens/example.npy"))
  offset = np.asarray(index.array("tokens/position.npy"))
  target = np.asarray(index.array("tokens/target.npy"))
  expected = sorted((e, o) for e, d in enumerate(docs) for o in range(len(d) - 1))
  assert sorted(zip(doc.tolist(), offset.tolist())) == expected
  np.testing.assert_array_equal(target, [docs[e][o + 1] for e, o in zip(doc, offset)])
  for e, d in enumerate(docs):
    np.testing.assert_array_equal(index.document(e), d)
    assert index.record_id(e) == 100 + e


def test_chunks_overlap_by_one_token():
  assert list(documents.chunk_starts(20, 8)) == [0, 8, 16]
  assert list(documents.chunk_starts(17, 8)) == [0, 8]  # 8..16 predicts targets 9..16
  assert list(documents.chunk_starts(1, 8)) == []


@pytest.mark.parametrize("top_k", [1, 2])
def test_single_pass_equals_influence_with_full_softmax_and_every_posting(tmp_path, top_k):
  cfg = tiny_config(*SMALL, f"prototypes.top_k={top_k}")
  graphdef, params = lm.init(cfg, 0)
  corpus = _corpus([5, 9, 20, 2, 1, 17, 30], cfg.model.vocab_size)
  index = _build(tmp_path, cfg, params, corpus, **EXACT)
  matrices = single_pass.HeadMatrices.of(params)
  for damping in (1e-3, 1e-1):
    for query in _queries(corpus):
      head = prototype.query_head(graphdef, params, query, cfg.data.seq_len)
      fast = single_pass.score(index, head, matrices, _values(damping))
      slow = influence.score(index, head, damping)
      scale = np.abs(slow.example_scores).max()
      assert scale > 0
      np.testing.assert_allclose(fast.example_scores, slow.example_scores, rtol=1e-5,
                                 atol=1e-6 * scale)
      tok_f, val_f = single_pass.token_scores(index, head, matrices, _values(damping))
      tok_s, val_s = influence.token_scores(index, head, damping)
      np.testing.assert_array_equal(tok_f, tok_s)
      np.testing.assert_allclose(val_f, val_s, rtol=1e-5, atol=1e-6 * np.abs(val_s).max())
      assert (val_s < 0).any() and (val_s > 0).any()  # signed: opponents too


def test_single_pass_matches_the_per_position_formula(small, tmp_path):
  """Scores the obvious way: full softmax p_t from the model, w_j = E (G_j + l I)^-1 g_q,
  sum over shared prototypes of a_qj a_tj (w_j . p_t - w_j[y_t]), summed per document."""
  cfg, params, corpus = small
  graphdef, _ = lm.abstract_model(cfg)
  index = _build(tmp_path, cfg, params, corpus, **EXACT)
  e = np.asarray(lm.unembedding(params), np.float64)
  damping = 1e-2
  query = _queries(corpus)[0]
  head = prototype.query_head(graphdef, params, query, cfg.data.seq_len)
  w = {}
  for a_q, j in zip(head.top_values, head.top_indices):
    g = index.curvature(int(j))
    w[int(j)] = (float(a_q), e @ np.linalg.solve(g + damping * np.eye(len(g)), head.grad))
  expected = np.zeros(index.num_examples)
  for d, doc in enumerate(_docs(corpus)):
    for start in documents.chunk_starts(len(doc), cfg.data.seq_len):
      chunk = doc[start:start + cfg.data.seq_len + 1]
      batch = common.rows_to_batch(chunk[None], np.array([len(chunk)]))
      out = _forward(graphdef, params, batch)
      p = np.asarray(jax.nn.softmax(out.logits[0]), np.float64)
      for t in range(len(chunk) - 1):
        for a_t, j in zip(np.asarray(out.prototypes.top_values[0, t]),
                          np.asarray(out.prototypes.top_indices[0, t])):
          if int(j) in w and a_t > 0:
            a_q, wj = w[int(j)]
            expected[d] += a_q * a_t * (wj @ p[t] - wj[chunk[t + 1]])
  got = single_pass.score(index, head, single_pass.HeadMatrices.of(params),
                         _values(damping)).example_scores
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_unembedding_term_is_the_preconditioned_dot_of_the_unembedding_gradients(small,
                                                                                 tmp_path):
  """The default term against autodiff: G_t = d CE(o_t E^T, y_t) / dE with the model's own
  mixed value o_t (its logits are o_t E^T), score = sum_{v,d} G_q G_t / (f_v + lambda) over
  the positions sharing a prototype or the target with the query, summed per document;
  with context sharpness beta, each position's term times cos(p_q, p_t)^beta (the full
  softmaxes here: the index keeps r = V entries)."""
  import jax.numpy as jnp
  import optax

  cfg, params, corpus = small
  graphdef, _ = lm.abstract_model(cfg)
  index = _build(tmp_path, cfg, params, corpus, target_postings=256, **EXACT)
  e = jnp.asarray(lm.unembedding(params), jnp.float32)
  u = np.asarray(params["prototype_head"]["values"], np.float32)
  grad_e = jax.jit(jax.grad(lambda e, o, y: optax.softmax_cross_entropy_with_integer_labels(
      o @ e.T, y)))
  positions = []  # (document, G_t, active prototypes, target)
  for d, doc in enumerate(_docs(corpus)):
    for start in documents.chunk_starts(len(doc), cfg.data.seq_len):
      chunk = doc[start:start + cfg.data.seq_len + 1]
      batch = common.rows_to_batch(chunk[None], np.array([len(chunk)]))
      out = _forward(graphdef, params, batch)
      act = np.asarray(out.prototypes.activations[0])
      mix = act @ u
      np.testing.assert_allclose(mix @ np.asarray(e).T, out.logits[0], rtol=1e-4, atol=1e-5)
      probs = np.asarray(jax.nn.softmax(out.logits[0].astype(jnp.float32)), np.float64)
      for t in range(len(chunk) - 1):
        positions.append((d, np.asarray(grad_e(e, mix[t], chunk[t + 1]), np.float64),
                          set(np.nonzero(act[t] > 0)[0].tolist()), int(chunk[t + 1]), probs[t]))
  counts = np.bincount([p[3] for p in positions], minlength=cfg.model.vocab_size)
  frequency = counts / counts.sum()
  np.testing.assert_allclose(index.target_frequency(), frequency)
  matrices = single_pass.HeadMatrices.of(params)
  signs = set()
  assert cfg.model.vocab_size == EXACT["softmax_top"]
  cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)
  for damping, beta in ((1e-3, 0.0), (1e-1, 0.0), (1e-3, 2.0)):
    for query in _queries(corpus):
      head = prototype.query_head(graphdef, params, query, cfg.data.seq_len)
      batch = query.batch(cfg.data.seq_len)
      out = _forward(graphdef, params, batch)
      act_q = np.asarray(out.prototypes.activations[0, query.position])
      g_q = np.asarray(grad_e(e, act_q @ u, query.target), np.float64)
      expected = np.zeros(index.num_examples)
      for d, g_t, active, y, p_t in positions:
        if active & set(np.nonzero(act_q > 0)[0].tolist()) or y == query.target:
          expected[d] += (np.sum(g_q * g_t / (frequency + damping)[:, None])
                          * cos(head.probs, p_t) ** beta)
      settings = single_pass.Settings("unembedding", unembedding_damping=damping,
                                      context_sharpness=beta, context_match=0.0)
      got = single_pass.score(index, head, matrices, settings).example_scores
      np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
      signs.update(np.sign(single_pass.token_scores(index, head, matrices, settings)[1]))
  assert {-1.0, 1.0} <= signs  # signed: opponents too


def test_truncated_postings_keep_the_largest_bounds(small, tmp_path):
  cfg, params, corpus = small
  full = _build(tmp_path, cfg, params, corpus, "full", index_keep_build_fields=True, **EXACT)
  cut = _build(tmp_path, cfg, params, corpus, "cut", **{**EXACT, "postings": 3})
  for j in range(cfg.prototypes.num_prototypes):
    tok_full, act_full = full.postings(j)
    tok_cut, _ = cut.postings(j)
    np.testing.assert_array_equal(tok_cut, tok_full[:3])  # the same order, cut at T
    bound = act_full * (1 - _p_target(full, tok_full))
    assert np.all(np.diff(bound) <= 1e-6)  # ordered by a_tj (1 - p_t[y_t])
    np.testing.assert_array_equal(cut.all_postings(j)[0], tok_full)  # influence: all


@pytest.mark.parametrize("seed", range(6))
def test_running_top_t_equals_one_sort_of_everything(seed):
  """postings.TopT against the top T of all entries at once, ordered (key desc, token asc):
  streamed batches (buffered, cut against each row's last slot), reads in the middle of the
  stream, ties, NaN and -0.0 keys, zero activations, and out-of-order tokens (a merge)."""
  rng = np.random.default_rng(seed)
  m, t, k = int(rng.integers(1, 9)), int(rng.integers(1, 7)), 2
  table, seen, first = postings.TopT(m, t), [], 0
  for batch in range(12):
    n = int(rng.integers(0, 9))
    token = np.repeat(first + np.arange(n), k)
    first += n
    if batch == 9:  # a batch that does not follow the stream (as when processes merge)
      token = rng.permutation(first + 50 + np.arange(n * k))
    proto = rng.integers(0, m, n * k)
    key = (rng.choice([0.0, -0.0, 0.5, 1.0, -1.0, np.nan], n * k) if seed % 2
           else rng.random(n * k)).astype(np.float32)
    act = rng.choice([0.0, 0.5, 1.0], n * k).astype(np.float32)
    table.add(proto, key, token, act)
    seen.append((proto, np.nan_to_num(key, nan=-np.inf), token, act))
    if batch == 5:
      table.token  # a read merges the buffer: the stream goes on after it
  proto, key, token, act = (np.concatenate(x) for x in zip(*seen))
  keep = act > 0
  order = np.lexsort((token[keep], -key[keep], proto[keep]))
  expected = {j: [] for j in range(m)}
  for p, kk, tok, a in zip(*(x[keep][order] for x in (proto, key, token, act))):
    if len(expected[p]) < t:
      expected[p].append((kk, tok, a))
  for j in range(m):
    filled = table.token[j] >= 0
    got = list(zip(table.key[j][filled], table.token[j][filled], table.act[j][filled]))
    assert got == expected[j], (j, got, expected[j])


def test_posting_records_are_copies_and_a_query_reads_nothing_else(small, tmp_path):
  """Each posting carries its position's fields (equal to the parts' rows), and the default
  method scores the same after every per-position file of the parts is deleted: its read
  is the k + 1 lists, whatever N is."""
  cfg, params, corpus = small
  graphdef, _ = lm.abstract_model(cfg)
  index = _build(tmp_path, cfg, params, corpus, postings=3, target_postings=2,
                 index_keep_build_fields=True)
  for j in range(cfg.prototypes.num_prototypes):
    records = index.posting_records(j)
    np.testing.assert_array_equal(records["token"], index.postings(j)[0])
    for field in index_lib.RECORD_FIELDS:
      np.testing.assert_array_equal(records[field], index.gather(field, records["token"]))
  for y in range(cfg.model.vocab_size):
    records = index.target_posting_records(y)
    np.testing.assert_array_equal(records["token"], index.target_postings(y))
    for field in index_lib.RECORD_FIELDS:
      np.testing.assert_array_equal(records[field], index.gather(field, records["token"]))
  matrices = single_pass.HeadMatrices.of(params)
  heads = [prototype.query_head(graphdef, params, q, cfg.data.seq_len) for q in _queries(corpus)]
  settings = [single_pass.Settings(), single_pass.Settings("both")]
  before = [single_pass.score(index, h, matrices, s).example_scores for h in heads
            for s in settings]
  assert any(np.abs(b).max() > 0 for b in before)
  for proc in index.manifest["processes"]:
    for part in proc["parts"]:
      for field in index_lib.PART_FIELDS:
        (tmp_path / "index" / part["path"] / f"{field}.npy").unlink(missing_ok=True)
  bare = index_lib.Index(str(tmp_path / "index"))
  after = [single_pass.score(bare, h, matrices, s).example_scores for h in heads
           for s in settings]
  for b, a in zip(before, after):
    np.testing.assert_array_equal(a, b)


def _p_target(index, tok):
  return index.gather("p_target", tok).astype(np.float64)


def test_sharded_run_mesh_gives_the_same_index(small, tmp_path):
  """On a (data 2, fsdp 2, model 2) mesh with parameters laid out like training (FSDP, the
  bank on the model axis), under the run's rules: the same index as on one device."""
  cfg, params, corpus = small
  graphdef, _, specs = abstract_params(cfg)
  cfg = dataclasses.replace(cfg, mesh=MeshConfig(2, 2, 2))
  mesh = sharding.make_mesh(cfg.mesh, jax.devices())
  attr = AttributionConfig(batch_size=1, shard_prototypes=3, neighbourhood_size=4,
                           index_part_batches=2, index_influence=True, curvature="blocks",
                           index_keep_build_fields=True, **EXACT)
  with jax.set_mesh(mesh), sharding.use_rules(cfg.mesh.rules):
    placed = jax.device_put(params, sharding.named(mesh, sharding.param_specs(
        lm.abstract_model(cfg)[1], cfg.mesh.rules)))
    indexing.build(cfg, graphdef, placed, corpus, str(tmp_path / "mesh"), attr, mesh=mesh)
  sharded = index_lib.Index(str(tmp_path / "mesh"))
  single = _build(tmp_path, cfg, params, corpus, "one", batch_size=8,
                  index_keep_build_fields=True, **EXACT)
  for field in ("target", "document", "offset", "top_indices", "softmax_ids"):
    np.testing.assert_array_equal(sharded.gather(field, np.arange(single.num_tokens)),
                                  single.gather(field, np.arange(single.num_tokens)))
  for field in ("top_values", "softmax_probs", "grad"):
    np.testing.assert_allclose(sharded.gather(field, np.arange(single.num_tokens)),
                               single.gather(field, np.arange(single.num_tokens)),
                               rtol=1e-4, atol=1e-6)
  for j in range(cfg.prototypes.num_prototypes):
    np.testing.assert_allclose(sharded.curvature(j), single.curvature(j), rtol=1e-3,
                               atol=1e-5 * np.abs(single.curvature(j)).max())


def _files(path):
  manifest = json.loads((path / "manifest.json").read_text())
  return manifest, {rel: np.load(path / rel) for rel in manifest["files"]}


def test_a_killed_build_resumes_to_the_same_index(small, tmp_path):
  cfg, params, corpus = small
  graphdef, _ = lm.abstract_model(cfg)
  attr = AttributionConfig(batch_size=2, shard_prototypes=3, neighbourhood_size=4,
                           index_part_batches=2, postings=5, softmax_top=4, curvature="blocks")
  whole = tmp_path / "whole"
  indexing.build(cfg, graphdef, params, corpus, str(whole), attr, devices=jax.devices()[:1])
  out = tmp_path / "resumed"
  for stop in (3, 1, 2):  # killed mid-part, before the next commit, then after one
    assert indexing.build(cfg, graphdef, params, corpus, str(out), attr,
                           devices=jax.devices()[:1], stop_after_batches=stop) is None
    assert not out.exists() and (tmp_path / "resumed.partial" / "progress.json").exists()
  indexing.build(cfg, graphdef, params, corpus, str(out), attr, devices=jax.devices()[:1])
  assert not (tmp_path / "resumed.partial").exists()
  want_manifest, want = _files(whole)
  got_manifest, got = _files(out)
  assert got_manifest == want_manifest
  for rel in want:
    np.testing.assert_array_equal(got[rel], want[rel], err_msg=rel)


@pytest.mark.parametrize("damage", ["state", "sums", "part"])
def test_a_half_built_index_damaged_from_outside_is_built_again(small, tmp_path, capsys,
                                                                 damage):
  """Commits are written whole, so a committed file cut short was damaged from outside
  (a disk, a hand): the build says so and starts again, instead of stopping in numpy."""
  cfg, params, corpus = small
  graphdef, _ = lm.abstract_model(cfg)
  attr = AttributionConfig(batch_size=2, shard_prototypes=3, neighbourhood_size=4,
                           index_part_batches=2, postings=5, softmax_top=4, curvature="blocks")
  build = lambda name, **k: indexing.build(cfg, graphdef, params, corpus, str(tmp_path / name),
                                           attr, devices=jax.devices()[:1], **k)
  build("whole")
  assert build("resumed", stop_after_batches=3) is None
  work = tmp_path / "resumed.partial"
  victim = {"state": next(work.glob("processes/*/state_*.npz")),
            "sums": next(work.glob("sums_*.npz")),
            "part": next(work.glob("processes/*/parts/*/target.npy"))}[damage]
  victim.write_bytes(victim.read_bytes()[:-9])
  build("resumed")
  assert "the half-built index at" in capsys.readouterr().err
  want_manifest, want = _files(tmp_path / "whole")
  got_manifest, got = _files(tmp_path / "resumed")
  assert got_manifest == want_manifest
  for rel in want:
    np.testing.assert_array_equal(got[rel], want[rel], err_msg=rel)


def test_a_folder_where_the_build_goes_that_is_not_a_build_is_left_alone(small, tmp_path):
  """The build works in <index>.partial and removes a stale build there: anything else
  found there is the user's, and stops the build in one line with nothing changed."""
  cfg, params, corpus = small
  graphdef, _ = lm.abstract_model(cfg)
  theirs = tmp_path / "notes.partial"
  theirs.mkdir()
  (theirs / "notes.txt").write_text("mine")
  with pytest.raises(UserError, match=r"notes.partial is where --index .*notes is built"):
    indexing.build(cfg, graphdef, params, corpus, str(tmp_path / "notes"),
                   AttributionConfig(batch_size=2), devices=jax.devices()[:1])
  assert (theirs / "notes.txt").read_text() == "mine"
  assert not (tmp_path / "notes").exists()


def test_an_index_of_the_same_build_is_kept_and_a_damaged_or_other_one_built_again(
    small, tmp_path, monkeypatch):
  """`make index` again over an up-to-date index (the same checkpoint, settings and
  documents) keeps it: no pass, the manifest untouched. A file cut short, other settings or
  another checkpoint of the same step: built again (otherwise `attribute` would say 'rebuild
  it' and `make index` 'up to date')."""
  cfg, params, corpus = small
  graphdef, _ = lm.abstract_model(cfg)
  attr = AttributionConfig(batch_size=2, shard_prototypes=3, neighbourhood_size=4,
                           postings=5, softmax_top=4)
  out = tmp_path / "index"
  build = lambda a=attr: indexing.build(cfg, graphdef, params, corpus, str(out), a,
                                        devices=jax.devices()[:1])
  first = build()
  assert "up_to_date" not in first
  written = (out / "manifest.json").stat().st_mtime_ns
  passes, real_pass = [], indexing._pass
  monkeypatch.setattr(indexing, "_pass", lambda *a, **k: passes.append(1) or real_pass(*a, **k))
  again = build()
  assert again.pop("up_to_date") and passes == []
  assert again == json.loads((out / "manifest.json").read_text())
  assert (out / "manifest.json").stat().st_mtime_ns == written
  victim = out / sorted(first["files"])[0]
  victim.write_bytes(victim.read_bytes()[:-1])
  assert "up_to_date" not in build() and passes == [1]
  assert "up_to_date" not in build(dataclasses.replace(attr, postings=3)) and passes == [1, 1]
  # One step of a run deleted and trained again is another checkpoint (its commit time):
  # built again, never 'up to date' over the first model's index.
  stamped = lambda ns: indexing.build(cfg, graphdef, params, corpus, str(out), attr,
                                      devices=jax.devices()[:1], step=4, saved_ns=ns)
  assert "up_to_date" not in stamped(111) and passes == [1, 1, 1]
  assert stamped(111).pop("up_to_date") and passes == [1, 1, 1]
  assert "up_to_date" not in stamped(222) and passes == [1, 1, 1, 1]
  assert json.loads((out / "manifest.json").read_text())["checkpoint_saved_ns"] == 222


@pytest.mark.parametrize("merged_tokens", [20, 1 << 24])
def test_merged_parts_hold_what_the_committed_parts_held(small, tmp_path, monkeypatch,
                                                         merged_tokens):
  """A build commits a part every attr.index_part_batches batches; the finished index
  merges each process's parts (a query's gather costs per part file). Merged into groups
  of at most 20 positions, or into one: the same positions, documents, spans and postings
  as the parts left unmerged."""
  cfg, params, corpus = small
  attr = dict(batch_size=1, index_part_batches=1, postings=5, softmax_top=4,
              neighbourhood_size=4, index_keep_build_fields=True)
  monkeypatch.setattr(indexing, "MERGED_PART_TOKENS", 1)  # every part stays alone
  apart = _build(tmp_path, cfg, params, corpus, "apart", **attr)
  monkeypatch.setattr(indexing, "MERGED_PART_TOKENS", merged_tokens)
  merged = _build(tmp_path, cfg, params, corpus, "merged", **attr)
  parts = lambda index: [part for p in index.manifest["processes"] for part in p["parts"]]
  assert len(parts(apart)) > 2  # one batch (of one chunk) per part
  sizes = [part["num_tokens"] for part in parts(merged)]
  assert sum(sizes) == apart.num_tokens
  assert (len(sizes) == 1 if merged_tokens > apart.num_tokens
          else 1 < len(sizes) < len(parts(apart)))
  on_disk = sorted(d.name for d in (tmp_path / "merged" / "processes/00000/parts").iterdir())
  assert on_disk == sorted(part["path"].rsplit("/", 1)[1] for part in parts(merged))
  every = np.arange(apart.num_tokens)
  for field in indexing.USED_BY:
    if field in index_lib.PART_FIELDS:
      np.testing.assert_array_equal(merged.gather(field, every), apart.gather(field, every))
  decode = lambda ids: " ".join(map(str, ids))
  for e in range(apart.num_examples):
    np.testing.assert_array_equal(merged.document(e), apart.document(e))
    assert merged.record_id(e) == apart.record_id(e)
  for t in every:
    assert merged.position_span(int(t), 3, decode) == apart.position_span(int(t), 3, decode)
  for j in range(cfg.prototypes.num_prototypes):
    for got, want in zip(merged.postings(j), apart.postings(j)):
      np.testing.assert_array_equal(got, want)


def test_compact_dtypes_and_what_the_parts_keep(small, tmp_path):
  """Ids uint16 where they fit, activations/probabilities float16. A finished index keeps
  per position only what some query or display reads (target, document, offset): the
  prototypes and top-r softmax live on in the postings' copies, unless
  attr.index_keep_build_fields."""
  cfg, params, corpus = small
  index = _build(tmp_path, cfg, params, corpus, "lean", postings=4, softmax_top=4)
  kept = _build(tmp_path, cfg, params, corpus, "kept", postings=4, softmax_top=4,
                index_keep_build_fields=True)
  files = index.manifest["files"]
  part = index.manifest["processes"][0]["parts"][0]["path"]
  assert files[f"{part}/target.npy"]["dtype"] == "uint16"
  shard = index.manifest["shards"][0]["path"]
  assert files[f"{shard}/posting_softmax_ids.npy"]["dtype"] == "uint16"
  assert files[f"{shard}/posting_softmax_probs.npy"]["dtype"] == "float16"
  assert files[f"{shard}/posting_top_indices.npy"]["dtype"] == "uint16"
  assert files["targets/target_softmax_probs.npy"]["dtype"] == "float16"
  chex.assert_shape(index.posting_records(0)["softmax_probs"], (4, 4))
  chex.assert_shape(index.posting_records(0)["top_values"], (4, cfg.prototypes.top_k))
  build_only = {"top_indices", "top_values", "softmax_ids", "softmax_probs", "p_target"}
  names = lambda ix: {rel.rsplit("/", 1)[1][:-4] for rel in ix.manifest["files"]
                      if rel.startswith("processes/")}
  assert not names(index) & build_only
  assert build_only <= names(kept)
  for rel in kept.manifest["files"]:
    assert (tmp_path / "kept" / rel).exists()
  per_token = index.manifest["bytes_per_token"]
  assert per_token["single_pass"] > 0 and per_token["all"] >= per_token["single_pass"]
  assert kept.manifest["bytes_by_method"] == index.manifest["bytes_by_method"]
  assert kept.manifest["bytes_total"] > index.manifest["bytes_total"]


def test_an_index_without_curvature_serves_the_default_method(small, tmp_path):
  """attr.curvature=none (the default): no per-prototype curvature or average softmax is
  summed or stored, the default term scores exactly as with them, and what needs them (the
  values term, influence) says so in one line; `attribute` builds them for those methods."""
  cfg, params, corpus = small
  graphdef, _ = lm.abstract_model(cfg)
  lean = _build(tmp_path, cfg, params, corpus, "lean", postings=4, curvature="none",
                index_influence=False)
  full = _build(tmp_path, cfg, params, corpus, "full", postings=4, index_influence=False)
  assert lean.manifest["curvature"] == "none"
  assert not [rel for rel in lean.manifest["files"] if "curvature" in rel or "prior" in rel]
  assert lean.manifest["bytes_by_method"]["single_pass"] < full.manifest["bytes_by_method"][
      "single_pass"]
  matrices = single_pass.HeadMatrices.of(params)
  for query in _queries(corpus):
    head = prototype.query_head(graphdef, params, query, cfg.data.seq_len)
    np.testing.assert_array_equal(single_pass.score(lean, head, matrices).example_scores,
                                  single_pass.score(full, head, matrices).example_scores)
    with pytest.raises(UserError, match="built with attr.curvature=none.*rebuild with"):
      single_pass.score(lean, head, matrices, _values(1e-3))
  with pytest.raises(UserError, match="attr.curvature=none"):
    run_lib.prepare("influence", cfg, graphdef, params, None, AttributionConfig(),
                    index_dir=str(tmp_path / "lean"), build_index=False)
  rows = [d[:9] for d in _docs(corpus) if len(d) >= 9]
  train = common.from_rows(np.stack(rows))
  built = run_lib.prepare("influence", cfg, graphdef, params, train, AttributionConfig(),
                          index_dir=str(tmp_path / "auto"))
  assert index_lib.Index(str(tmp_path / "auto")).manifest["curvature"] == "blocks"
  assert built.query(_queries(corpus)[0]).example_scores.shape == (train.num_examples,)


def test_bad_input_is_one_line(small, tmp_path):
  cfg, params, corpus = small
  with pytest.raises(UserError, match="attr.softmax_top=33 exceeds the vocabulary"):
    _build(tmp_path, cfg, params, corpus, softmax_top=33)
  with pytest.raises(ConfigError, match=r"attr\.postings=-1 must be"):
    apply_overrides(AttributionConfig(), ["attr.postings=-1"])
  with pytest.raises(ConfigError, match=r"attr\.softmax_top=0 must be"):
    apply_overrides(AttributionConfig(), ["attr.softmax_top=0"])
  old = tmp_path / "old"
  old.mkdir()
  (old / "manifest.json").write_text(json.dumps({"format": "prism-index/1"}))
  with pytest.raises(UserError, match="holds index format 'prism-index/1'.*rebuild"):
    index_lib.Index(str(old))


def test_single_pass_is_the_default_method():
  assert run_lib.METHODS[0] == run_lib.DEFAULT_METHOD == "single_pass"
  assert {"prototype", "influence"} <= set(run_lib.METHODS)


@pytest.fixture(scope="module")
def trained_documents():
  """A tiny PRISM model trained on every chunk of 10 random-token documents of 2-4 chunks.

  128 prototypes for ~400 positions: each prototype's neighbourhood spans a few passages,
  as at scale (16k prototypes). With 32 the sums over whole documents of the exact head
  influence (= `influence`) let a long passage sharing many prototypes outscore the copied
  one for some queries."""
  from prism_jax.attribution import retrain

  cfg = tiny_config("train.steps=200", "optimizer.warmup_steps=10",
                    "prototypes.num_prototypes=128", *ROUND_ONE_HEAD)
  corpus = _corpus([30, 41, 50, 35, 45, 38, 33, 60, 40, 36], cfg.model.vocab_size, seed=1)
  length = cfg.data.seq_len
  rows, lengths = [], []
  for doc in _docs(corpus):
    for start in documents.chunk_starts(len(doc), length):
      chunk = doc[start:start + length + 1]
      rows.append(np.pad(chunk, (0, length + 1 - len(chunk))))
      lengths.append(len(chunk))
  train = common.TrainingSet(np.stack(rows), np.asarray(lengths, np.int32),
                             np.arange(len(rows), dtype=np.int64))
  graphdef, _ = lm.abstract_model(cfg)
  return cfg, graphdef, retrain.fit(cfg, train, seed=0), corpus


# On this memorised toy the values term (= influence) finds every copied query's passage
# first, and so does the default (the unembedding term, context sharpness 1) with its
# same-text weight. Without that weight (attr.context_match=0) it finds 19 of 20 first and
# the other second; without the prediction-similarity weight as well
# (attr.context_sharpness=0), 18: every position that predicts the same token from the same
# prototypes scores alike (docs/attribution.md, "Copied queries").
@pytest.mark.parametrize("curvature, terms, match", [("blocks", "values", 0.0),
                                                     ("shared", "values", 0.0),
                                                     ("blocks", "unembedding", 0.0),
                                                     ("blocks", "unembedding", 100.0)])
def test_a_query_from_the_middle_of_a_document_brings_it_back_first(trained_documents, tmp_path,
                                                                     curvature, terms, match):
  cfg, graphdef, params, corpus = trained_documents
  attr = AttributionConfig(batch_size=8, postings=16, softmax_top=8,  # truncated, float16
                           curvature=curvature, single_pass_terms=terms, context_match=match)
  indexing.build(cfg, graphdef, params, corpus, str(tmp_path / "index"), attr,
                  devices=jax.devices()[:1])
  index = index_lib.Index(str(tmp_path / "index"))
  prepared = run_lib.prepare("single_pass", cfg, graphdef, params, None, attr,
                             index_dir=str(tmp_path / "index"), build_index=False)
  length = cfg.data.seq_len
  ranks = []
  for e, doc in enumerate(_docs(corpus)):
    start = list(documents.chunk_starts(len(doc), length))[1]  # the second chunk, not the opening
    for end in (start + 6, start + 11):
      query = common.Query(tuple(int(t) for t in doc[start:end]), int(doc[end]))
      scores = prepared.query(query)
      ranks.append(int(np.sum(scores.example_scores > scores.example_scores[e])))
      if terms == "values":  # its best position is the query's own (the default's need not
        best = scores.best_token[e]  # be: another position of the passage may agree more)
        assert index.gather("offset", np.array([best]))[0] == end - 1
  if terms == "values" or match:
    assert ranks == [0] * 20, ranks
  else:
    assert max(ranks) <= 1 and ranks.count(0) >= 19, ranks


def test_the_same_text_weight_multiplies_exactly_the_positions_with_the_querys_context(
    small, tmp_path):
  """A query copied from a document (at offset 5) matches its own position's fingerprint;
  with attr.context_match = gamma those positions score (1 + gamma) times, the rest alike."""
  cfg, params, corpus = small
  graphdef, _ = lm.abstract_model(cfg)
  index = _build(tmp_path, cfg, params, corpus, target_postings=256,
                 index_keep_build_fields=True, **EXACT)
  matrices = single_pass.HeadMatrices.of(params)
  doc_id, doc = next((d, doc) for d, doc in enumerate(_docs(corpus)) if len(doc) > 9)
  query = common.Query(tuple(int(t) for t in doc[:6]), int(doc[6]))
  head = prototype.query_head(graphdef, params, query, cfg.data.seq_len)
  tok0, val0 = single_pass.token_scores(index, head, matrices,
                                        single_pass.Settings(context_match=0.0))
  tok, val = single_pass.token_scores(index, head, matrices,
                                      single_pass.Settings(context_match=9.0))
  np.testing.assert_array_equal(tok, tok0)
  same = index.gather("context", tok) == head.context
  own = tok[(index.gather("document", tok) == doc_id) & (index.gather("offset", tok) == 5)]
  assert len(own) == 1 and same[np.searchsorted(tok, own[0])]
  np.testing.assert_allclose(val[same], 10.0 * val0[same], rtol=1e-12)
  np.testing.assert_array_equal(val[~same], val0[~same])


def test_documents_from_the_source_are_tokenised_like_training():
  from prism_jax.data.pipeline import _Tokenize
  from tests.text_model import CharTokenizer

  tok = CharTokenizer()
  source = [{"text": "the cat sat"}, {"text": b"on the mat"}, {"text": "x"}]
  corpus = documents.from_source(source, tok)
  docs = list(corpus.open())
  assert corpus.num_documents == 3 and [d.record_id for d in docs] == [0, 1, 2]
  for doc, record in zip(docs, source):
    np.testing.assert_array_equal(doc.tokens, _Tokenize(tok, "text")(record))
  sample = documents.from_source(source, tok, max_documents=2, seed=0)
  assert [d.ordinal for d in sample.open()] == [0, 1]  # renumbered, in record order
  assert [d.ordinal for d in documents.for_process(corpus.open(), 1, 2)] == [1]


def test_top_results_name_the_document_and_its_best_position(small, tmp_path):
  from prism_jax.attribution import service

  cfg, params, corpus = small
  graphdef, _ = lm.abstract_model(cfg)
  index = _build(tmp_path, cfg, params, corpus, postings=8)
  attr = AttributionConfig(top_examples=3, span_tokens=4)
  query = _queries(corpus)[0]
  scores, found = service.explain(cfg, graphdef, params, index, query, attr,
                                  index_lib.default_decode)
  assert [r["rank"] for r in found] == [1, 2, 3]
  assert found[0]["score"] == scores.example_scores.max()
  assert found[0]["text"]
  for r in found:
    doc = _docs(corpus)[r["example"]]
    assert r["example_id"] == 100 + r["example"]
    if r["score"] == 0:  # no position of it shares a prototype with the query
      assert r["text"] == ""
      continue
    assert r["text"] == index_lib.span_text(doc, r["position"], 4, index_lib.default_decode)


@pytest.mark.slow  # two processes start jax and compile (~30 s on 2 cores)
def test_two_processes_index_their_shares_into_the_same_index(tmp_path):
  """Each process indexes every other document into its own folder; the finished index
  has the same positions, postings and curvature as one process's (token ids differ:
  they run through processes, then parts)."""
  from tests.test_multiprocess import ROOT, _env
  import portpicker
  import subprocess
  import sys

  def run(out, processes, **extra_env):
    port = portpicker.pick_unused_port()
    procs = []
    for pid in range(processes):
      env = _env(**extra_env) if processes == 1 else _env(
          JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(processes),
          JAX_PROCESS_ID=str(pid), **extra_env)
      procs.append(subprocess.Popen([sys.executable, "-m", "tests.index_worker", str(out)],
                                    cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True))
    results = [(p, *p.communicate(timeout=300)) for p in procs]
    if extra_env:
      return results
    for p, stdout, stderr in results:
      assert p.returncode == 0, stderr[-3000:]
    return index_lib.Index(str(out / "index"))

  # Folders the processes do not share (each host's own disk): one line on each, no index.
  for pid, (p, _, stderr) in enumerate(run(tmp_path / "own", 2, PRISM_WORKER_OWN_INDEX="1")):
    assert p.returncode == 2, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith(
        f"error: --index {tmp_path}/own/index_{pid}.partial is not shared by the run's "
        "processes: process(es) 1 of 2 cannot see"), stderr[-3000:]
  assert not (tmp_path / "own" / "index_0").exists()
  two, one = run(tmp_path / "two", 2), run(tmp_path / "one", 1)
  assert [p["path"] for p in two.manifest["processes"]] == ["processes/00000",
                                                              "processes/00001"]
  assert two.num_tokens == one.num_tokens and two.num_examples == one.num_examples

  def keyed(index):
    ids = np.arange(index.num_tokens)
    key = index.gather("document", ids).astype(np.int64) * 1000 + index.gather("offset", ids)
    return key, np.argsort(key)

  key_two, order_two = keyed(two)
  key_one, order_one = keyed(one)
  np.testing.assert_array_equal(key_two[order_two], key_one[order_one])
  for field in ("target", "top_indices", "softmax_ids"):
    np.testing.assert_array_equal(two.gather(field, order_two), one.gather(field, order_one))
  np.testing.assert_allclose(two.gather("softmax_probs", order_two),
                             one.gather("softmax_probs", order_one), rtol=1e-5, atol=1e-7)
  for j in range(two.manifest["num_prototypes"]):
    assert sorted(key_two[two.postings(j)[0]]) == sorted(key_one[one.postings(j)[0]])
    np.testing.assert_allclose(two.curvature(j), one.curvature(j), rtol=1e-4,
                               atol=1e-6 * np.abs(one.curvature(j)).max())
  for e in range(one.num_examples):
    np.testing.assert_array_equal(two.document(e), one.document(e))


def test_tail_estimates_against_the_full_softmax(trained_documents, tmp_path):
  """Relative L1 error of document scores from the top-4 softmax entries against the full
  softmax, for each way of estimating the left-out mass; the prototype's average softmax
  must beat dropping the mass and the even spread (which is worse than dropping it here)."""
  cfg, graphdef, params, corpus = trained_documents
  vocab = cfg.model.vocab_size

  def build(name, r, dtype):
    attr = AttributionConfig(batch_size=8, postings=0, softmax_top=r, index_dtype=dtype,
                             index_influence=False, curvature="blocks")
    indexing.build(cfg, graphdef, params, corpus, str(tmp_path / name), attr,
                    devices=jax.devices()[:1])
    return index_lib.Index(str(tmp_path / name))

  exact, top4 = build("exact", vocab, "float32"), build("top4", 4, "float16")
  matrices = single_pass.HeadMatrices.of(params)
  errors = {tail: [] for tail in single_pass.TAILS}
  for doc in _docs(corpus):
    query = common.Query(tuple(int(t) for t in doc[20:28]), int(doc[28]))
    head = prototype.query_head(graphdef, params, query, cfg.data.seq_len)
    want = single_pass.score(exact, head, matrices, _values(1e-3)).example_scores
    for tail in errors:
      got = single_pass.score(top4, head, matrices, _values(1e-3, tail)).example_scores
      errors[tail].append(np.abs(got - want).sum() / np.abs(want).sum())
  mean = {tail: float(np.mean(v)) for tail, v in errors.items()}
  print("relative L1 error by tail estimate:", mean)
  assert mean["prototype"] < mean["none"] and mean["prototype"] < mean["uniform"], mean


def test_shared_basis_curvature_is_the_diagonal_of_each_block_in_that_basis(small, tmp_path):
  """attr.curvature=shared streams [M, D] instead of [M, D, D]: its values must be
  diag(Q^T G_j Q) of the exact blocks, Q = eigenvectors of E^T E."""
  cfg, params, corpus = small
  graphdef, _ = lm.abstract_model(cfg)
  exact = _build(tmp_path, cfg, params, corpus, "blocks", **EXACT)
  shared = _build(tmp_path, cfg, params, corpus, "shared", curvature="shared", **EXACT)
  e = np.asarray(lm.unembedding(params), np.float64)
  basis = np.linalg.eigh(e.T @ e)[1]
  for j in range(cfg.prototypes.num_prototypes):
    values, q = shared.curvature_eigen(j)
    np.testing.assert_allclose(q, basis, atol=1e-6)
    want = np.maximum(np.diag(basis.T @ exact.curvature(j) @ basis), 0)
    np.testing.assert_allclose(values, want, rtol=1e-3, atol=1e-6 * want.max())
  assert "curvature_vectors" not in " ".join(shared.manifest["files"])
  # single_pass and influence still agree on it (they share the stored curvature).
  query = _queries(corpus)[0]
  head = prototype.query_head(graphdef, params, query, cfg.data.seq_len)
  fast = single_pass.score(shared, head, single_pass.HeadMatrices.of(params),
                           _values(1e-2)).example_scores
  slow = influence.score(shared, head, 1e-2).example_scores
  np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-6 * np.abs(slow).max())
  with pytest.raises(UserError, match="attr.curvature='diag' must be none, blocks or shared"):
    _build(tmp_path, cfg, params, corpus, "bad", curvature="diag")


def test_sparse_scores_rank_and_sum_as_the_dense_arrays_did():
  """document_scores keeps only the scored documents; its sums, best positions and top-k
  equal the dense [E] computation, zero-scored and negative documents included."""
  from prism_jax.attribution import common, prototype
  rng = np.random.default_rng(11)
  num_examples = 40
  for positions in (0, 1, 25, 300):
    ex = rng.integers(0, num_examples, positions)
    val = rng.choice([-1.0, 0.0, 0.5, 1.0, 2.0], positions) * rng.integers(1, 3, positions)
    tok = rng.permutation(10_000)[:positions]
    got = prototype.document_scores(tok, val, ex, num_examples)
    dense = np.bincount(ex, weights=val, minlength=num_examples)
    best = np.full(num_examples, -1)
    for e in range(num_examples):
      mine = np.nonzero(ex == e)[0]
      if len(mine):
        top_val = val[mine].max()
        best[e] = tok[mine[val[mine] == top_val][-1]]  # ties: the later position
    np.testing.assert_allclose(got.example_scores, dense, rtol=1e-12)
    np.testing.assert_array_equal(got.best_token, best)
    assert len(got.ids) == len(np.unique(ex))
    for k in (1, 5, 39, 40, 60):
      np.testing.assert_array_equal(got.top(k), common.top_examples(dense, k))
      np.testing.assert_allclose(got.score_of(got.top(k)), dense[got.top(k)], rtol=1e-12)
      np.testing.assert_array_equal(got.best_of(got.top(k)), best[got.top(k)])
  empty = prototype.Scores.empty(3)
  np.testing.assert_array_equal(empty.top(2), [0, 1])
  np.testing.assert_array_equal(empty.score_of([0, 2]), [0.0, 0.0])
  np.testing.assert_array_equal(empty.best_of([1]), [-1])
