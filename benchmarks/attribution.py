"""Attribution speed and stored bytes against N: `python -m benchmarks.attribution [--quick]`.

For a PRISM model trained on the embedded corpus (`--workdir`, default runs/bench/prism_tiny:
prism_tiny trained by `python -m prism_jax.main.train` when no checkpoint is there, then
reused), every method of `prism_jax.attribution.run.METHODS` is timed at each N of `--sizes`
(default 1e5, 1e6 and the whole training split). N counts scored training tokens: the first
N targets of the training stream (the train split's documents in record order, every token of
every document, the last document cut so that exactly N targets are scored). The prototype
methods read an index of those documents (built once per N and checkpoint under
<out>/cache/, reused by later runs); the post-hoc baselines score the same tokens as chunks
of at most seq_len+1 tokens (documents.py's chunking). Queries are next-token predictions at
seeded positions of validation passages.

Per method and N, in a fresh process (so VmHWM is that method's peak): prepare time (index
build / factors / projected features), per-query time (median of warm queries after one
warm-up query), peak resident memory, and the bytes of stored attribution state. TRAK runs
at its configured projection size and at the size whose stored features equal single_pass's
index bytes at that N (`trak.dim_for_bytes`).

What cannot run at an N on this machine within the caps is measured at the largest N that
fits and extrapolated linearly in N from the measured points (query time = a + b N from the
two largest measured N; the arithmetic is printed and stored, the row is marked
"extrapolated"): EK-FAC and grad-dot recompute every training gradient per query (above
--direct-ekfac / --direct-graddot tokens), influence stores g_t [N, D] (above
--direct-influence). TRAK computes real projected features for at most --trak-examples
examples; above that its prepare time is extrapolated per example and its query is timed on
a state of the exact size [E, dim] whose rows repeat the real features (the query's cost does
not depend on their values); such rows are marked "tiled".

Writes <out>/attribution.json, <out>/attribution.md and <out>/attribution_speed.png.
`--quick`: tiny sizes, a random-weight model on random tokens, everything in this process
(labelled as such; peak memory is then not per method); under a minute.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time

from prism_jax import outputs
from prism_jax.errors import UserError, exit_on_user_error

METHODS = ("single_pass", "prototype", "influence", "ekfac", "trak", "graddot")
INDEX_METHODS = ("single_pass", "prototype", "influence")
EXP = "prism_tiny"
# --quick: a small random-weight PRISM model on random tokens (speed plumbing only).
QUICK_OVERRIDES = [
    "model.vocab_size=256", "model.d_model=32", "model.d_ff=64", "model.num_layers=1",
    "model.num_heads=2", "data.seq_len=32", "model.max_seq_len=32",
    "prototypes.num_prototypes=32", "prototypes.top_k=4", "train.progress=false",
]
MIN_PROMPT = 8


# ------------------------------------------------------------------------------------------
# Small helpers


def _rss(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field):
        return int(line.split()[1]) * 1024
  return 0


def _size(text: str, total: int) -> int:
  return total if text == "all" else int(float(text))


def _fmt_n(n: int) -> str:
  return f"{n:,}"


def _log(msg: str):
  print(msg, flush=True)


# ------------------------------------------------------------------------------------------
# The training stream and the queries (computed once, cached as arrays)


def _stream_quick(seed: int = 0) -> dict:
  """Random documents over the quick model's vocabulary (synthetic; labelled so)."""
  import numpy as np
  rng = np.random.default_rng(seed)
  lengths = rng.integers(20, 90, 200)
  tokens = rng.integers(3, 256, int(lengths.sum())).astype(np.int32)
  rows = rng.integers(3, 256, (16, 33)).astype(np.int32)
  return {"tokens": tokens, "offsets": np.r_[0, np.cumsum(lengths)].astype(np.int64),
          "records": np.arange(len(lengths), dtype=np.int64), "query_rows": rows,
          "source": "random tokens over a 256-token vocabulary (synthetic)"}


def _stream_corpus(cfg, seed: int = 0, queries: int = 16) -> dict:
  """Every document of the train split in record order ([bos] + ids + [eos], nothing cut,
  as training and the index see them) and validation rows for the queries."""
  import numpy as np

  from prism_jax import data as data_lib
  from prism_jax.attribution import documents

  bundle = data_lib.prepare(cfg.data, cfg.model.vocab_size)
  docs = list(documents.from_source(bundle.train_source, bundle.tokenizer,
                                    cfg.data.text_key).open())
  tokens = np.concatenate([d.tokens for d in docs]).astype(np.int32)
  offsets = np.r_[0, np.cumsum([len(d.tokens) for d in docs])].astype(np.int64)
  length = cfg.data.seq_len + 1
  rng = np.random.default_rng(seed + 1)
  rows = []
  for record in rng.permutation(len(bundle.validation_source)):
    text = bundle.validation_source[int(record)][cfg.data.text_key]
    text = text.decode("utf-8") if isinstance(text, bytes) else text
    ids = [bundle.tokenizer.bos_id, *bundle.tokenizer.encode(text)]
    if len(ids) >= length:
      rows.append(ids[:length])
      if len(rows) == queries:
        break
  return {"tokens": tokens, "offsets": offsets,
          "records": np.array([d.record_id for d in docs], np.int64),
          "query_rows": np.array(rows, np.int32),
          "source": (f"{cfg.data.dataset} train split ({len(docs)} documents, "
                     f"{int((np.diff(offsets) - 1).clip(0).sum()):,} scored tokens), "
                     f"sentencepiece {bundle.tokenizer.vocab_size}")}


def scored_total(stream) -> int:
  import numpy as np
  return int((np.diff(stream["offsets"]) - 1).clip(0).sum())


def prefix_documents(stream, n: int) -> list:
  """The first documents of the stream holding exactly n scored tokens (the last one cut)."""
  from prism_jax.attribution import documents
  out, left = [], n
  offsets, tokens, records = stream["offsets"], stream["tokens"], stream["records"]
  for i in range(len(offsets) - 1):
    if left <= 0:
      break
    doc = tokens[offsets[i]:offsets[i + 1]]
    scored = max(len(doc) - 1, 0)
    if scored > left:
      doc = doc[:left + 1]
      scored = left
    out.append(documents.Document(len(out), int(records[i]), doc))
    left -= scored
  return out


def corpus_of(docs):
  from prism_jax.attribution import documents
  return documents.Corpus(len(docs), lambda: iter(docs))


def chunk_rows(docs, seq_len: int):
  """The baselines' examples: every document cut into chunks of <= seq_len+1 tokens that
  overlap by one (documents.chunk_starts), so the same N targets are scored once each."""
  import numpy as np

  from prism_jax.attribution import common, documents
  pieces, ids = [], []
  for d in docs:
    for start in documents.chunk_starts(len(d.tokens), seq_len):
      pieces.append(d.tokens[start:start + seq_len + 1])
      ids.append(d.record_id)
  rows = np.zeros((len(pieces), seq_len + 1), np.int32)
  for i, p in enumerate(pieces):
    rows[i, :len(p)] = p
  return common.TrainingSet(rows, np.array([len(p) for p in pieces], np.int32),
                            np.array(ids, np.int64))


def make_queries(stream, count: int, seed: int = 0) -> list:
  from prism_jax.attribution import text_examples
  return text_examples.queries_from_rows(stream["query_rows"][:count], seed + 2)


# ------------------------------------------------------------------------------------------
# The model


_QUICK_MODEL = []


def load_model(spec: dict):
  """(cfg, graphdef, params, step) of the benchmarked model."""
  import experiments
  from prism_jax.config import apply_overrides
  from prism_jax.models import lm
  if spec["quick"]:
    if not _QUICK_MODEL:  # in-process: one model, so compiled functions are reused
      cfg = apply_overrides(experiments.get(EXP), QUICK_OVERRIDES)
      _QUICK_MODEL.append((cfg, *lm.init(cfg, 0), 0))
    return _QUICK_MODEL[0]
  from prism_jax.run import Run
  run = Run.open(EXP, spec["workdir"])
  graphdef, params, step = run.params()
  return run.cfg, graphdef, params, step


def attr_config(spec: dict, extra=()):
  from prism_jax.attribution.config import AttributionConfig, apply_overrides
  return apply_overrides(AttributionConfig(), list(spec["attr"]) + list(extra))


# ------------------------------------------------------------------------------------------
# Workers: one stage each (a fresh process in the full benchmark)


def _load_stream(spec):
  import numpy as np
  with np.load(spec["stream"]) as f:
    return {k: f[k] for k in f.files}


def worker_index(spec: dict) -> dict:
  """Builds the index of the first N tokens into spec['index_dir'] (single_pass, prototype
  and, when spec['influence'], influence read it)."""
  from prism_jax.attribution import index as index_lib, indexing
  cfg, graphdef, params, step = load_model(spec)
  stream = _load_stream(spec)
  docs = prefix_documents(stream, spec["tokens"])
  attr = attr_config(spec, [f"attr.index_influence={str(spec['influence']).lower()}"])
  decode = index_lib.default_decode
  if not spec["quick"]:
    from prism_jax import restore
    decode = restore.load_tokenizer(cfg).decode
  started = time.perf_counter()
  manifest = indexing.build(cfg, graphdef, params, corpus_of(docs), spec["index_dir"], attr,
                             decode=decode, step=step)
  seconds = time.perf_counter() - started
  return {"seconds": seconds, "peak_rss": _rss("VmHWM"), "num_tokens": manifest["num_tokens"],
          "num_examples": manifest["num_examples"], "has_influence": spec["influence"],
          "bytes_by_method": manifest["bytes_by_method"],
          "bytes_per_token": manifest.get("bytes_per_token"),
          "bytes_total": manifest["bytes_total"], "step": step}


def _time_queries(query, queries) -> list[float]:
  times = []
  for q in queries:
    started = time.perf_counter()
    query(q)
    times.append(time.perf_counter() - started)
  return times


def worker_measure(spec: dict) -> dict:
  """Times one method at one N: prepare, one warm-up query, then the timed queries."""
  from prism_jax.attribution import run
  cfg, graphdef, params, step = load_model(spec)
  stream = _load_stream(spec)
  queries = make_queries(stream, spec["queries"] + 1)
  docs = prefix_documents(stream, spec["tokens"])
  method = spec["method"]
  attr = attr_config(spec, spec.get("extra_attr", []))
  row = {"method": method, "variant": spec.get("variant", method), "tokens": spec["tokens"],
         "status": "measured", "step": step}
  base = _rss("VmRSS")
  if method == "trak":
    return {**row, **_measure_trak(spec, cfg, graphdef, params, docs, queries, attr)}
  if method in INDEX_METHODS:
    started = time.perf_counter()
    prepared = run.prepare(method, cfg, graphdef, params, None, attr,
                           index_dir=spec["index_dir"], build_index=False)
    open_s = time.perf_counter() - started
    row.update(examples=len(docs), prepare_s=spec["index_seconds"], open_s=open_s,
               prepare_note="index build (shared by the prototype methods)")
    prepared.query(queries[0])  # warm-up: compilation of the query's forward pass
  else:
    train = chunk_rows(docs, cfg.data.seq_len)
    started = time.perf_counter()
    prepared = run.prepare(method, cfg, graphdef, params, train, attr)
    row.update(examples=train.num_examples, prepare_s=time.perf_counter() - started)
    if method == "ekfac" and 0 < attr.ekfac_fit_examples < train.num_examples:
      row["prepare_note"] = (f"factors fitted on the first {attr.ekfac_fit_examples} of "
                             f"{train.num_examples} examples (--ekfac-fit-examples)")
    # Warm-up on one batch of examples: compiles the same per-batch functions.
    warm = run.prepare(method, cfg, graphdef, params,
                       train.subset(range(min(attr.batch_size, train.num_examples))), attr)
    warm.query(queries[0])
  times = _time_queries(prepared.query, queries[1:])
  return {**row, "query_s": statistics.median(times), "query_times": times,
          "stored_bytes": int(prepared.stored_bytes), "peak_rss": _rss("VmHWM"),
          "rss_before": base}


def _measure_trak(spec, cfg, graphdef, params, docs, queries, attr) -> dict:
  """TRAK at spec['dim'] (or the dim whose state equals spec['equal_bytes']): real features
  for at most spec['trak_examples'] examples, the state tiled to the full size beyond."""
  import numpy as np

  from prism_jax.attribution import trak
  train = chunk_rows(docs, cfg.data.seq_len)
  e = train.num_examples
  dim = spec.get("dim") or trak.dim_for_bytes(spec["equal_bytes"], e, attr.trak_ensemble)
  proj = trak.projection(params, dim, attr.trak_seed, attr.trak_ensemble)
  real = min(e, spec["trak_examples"])
  compiled_in = real <= attr.batch_size  # one batch: its time includes the compilation
  if not compiled_in:
    first = train.subset(range(attr.batch_size))
    trak.prepare(graphdef, params, first, proj, attr.trak_damping, attr.batch_size)  # compile
  started = time.perf_counter()
  state = trak.prepare(graphdef, params, train.subset(range(real)), proj, attr.trak_damping,
                       attr.batch_size)
  real_s = time.perf_counter() - started
  out = {"examples": e, "dim": dim, "real_examples": real}
  if real < e:
    started = time.perf_counter()
    reps = -(-e // real)
    phi = np.tile(state.features, (1, reps, 1))[:, :e]
    inverses = []
    for member in phi.astype(np.float64):  # as trak.prepare does, over the full-size state
      gn = member.T @ member / max(len(member), 1)
      lam = attr.trak_damping * max(float(np.mean(np.diag(gn))), 1e-30)
      inverses.append(np.linalg.inv(gn + lam * np.eye(gn.shape[0])))
    state = trak.TrakState(phi.astype(np.float32), np.stack(inverses).astype(np.float32))
    inverse_s = time.perf_counter() - started
    out.update(status="tiled", prepare_s=real_s * e / real + inverse_s,
               prepare_note=(f"extrapolated: {real_s:.2f} s for {real} examples"
                             + (" (with compilation)" if compiled_in else "")
                             + f" x {e}/{real} + {inverse_s:.2f} s inverse"),
               note=(f"query timed on the exact-size state [{e}, {dim}] whose rows repeat "
                     f"{real} real projected features"))
  else:
    out.update(prepare_s=real_s)
  length = cfg.data.seq_len
  query = lambda q: trak.score(state, graphdef, params, proj, q, length)
  query(queries[0])  # warm-up
  times = _time_queries(query, queries[1:])
  return {**out, "query_s": statistics.median(times), "query_times": times,
          "stored_bytes": int(state.nbytes), "peak_rss": _rss("VmHWM")}


def worker_side_by_side(spec: dict) -> dict:
  """single_pass on every built index at once, queries interleaved across them (each query
  on every N in turn, `repeats` rounds), so machine load falls on every N alike: per N the
  median query time and how many postings the query read (in all, and distinct positions)."""
  import numpy as np

  from prism_jax.attribution import index as index_lib, prototype, run, single_pass
  cfg, graphdef, params, _ = load_model(spec)
  queries = make_queries(_load_stream(spec), spec["queries"] + 1)
  attr = attr_config(spec)
  sizes = [int(n) for n in spec["indexes"]]
  prepared = {n: run.prepare("single_pass", cfg, graphdef, params, None, attr,
                             index_dir=spec["indexes"][str(n)], build_index=False)
              for n in sizes}
  for p in prepared.values():
    p.query(queries[0])  # warm-up
  times = {n: [] for n in sizes}
  for _ in range(spec["repeats"]):
    for q in queries[1:]:
      for n in sizes:
        started = time.perf_counter()
        prepared[n].query(q)
        times[n].append(time.perf_counter() - started)
  read = {n: [] for n in sizes}
  distinct = {n: [] for n in sizes}
  matrices, settings = single_pass.HeadMatrices.of(params), single_pass.Settings.of(attr)
  for n in sizes:
    index = index_lib.Index(spec["indexes"][str(n)])
    for q in queries[1:]:
      head = prototype.query_head(graphdef, params, q, cfg.data.seq_len)
      lists = [len(index.postings(int(j))[0]) for a, j in zip(head.top_values,
                                                             head.top_indices) if a > 0]
      read[n].append(sum(lists) + len(index.target_postings(head.target)))
      distinct[n].append(len(single_pass.token_scores(index, head, matrices, settings)[0]))
  return {"rows": [{"tokens": n, "query_s": statistics.median(times[n]),
                    "query_times": times[n], "postings_read": float(np.mean(read[n])),
                    "distinct_positions": float(np.mean(distinct[n]))} for n in sizes],
          "queries": spec["queries"], "repeats": spec["repeats"]}


WORKERS = {"index": worker_index, "measure": worker_measure,
           "side_by_side": worker_side_by_side}


class StageFailed(RuntimeError):
  pass


CACHED_ONLY = False  # --cached-only: assemble the report from cached measurements only


def call(spec: dict, in_process: bool) -> dict:
  """Runs a stage (in a fresh process unless `in_process`); StageFailed carries its error."""
  if in_process:
    try:
      return WORKERS[spec["stage"]](spec)
    except Exception as e:  # a method that fails is reported, the others still run
      import traceback
      raise StageFailed(f"{type(e).__name__}: {e}".splitlines()[0][:300],
                        traceback.format_exc()) from None
  cmd = [sys.executable, "-m", "benchmarks.attribution", "--worker", json.dumps(spec)]
  env = dict(os.environ)
  if spec.get("blas_threads"):
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
      env[name] = str(spec["blas_threads"])
  out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
  if out.returncode:
    last = [l for l in out.stderr.strip().splitlines() if l.strip()] or ["(no stderr)"]
    raise StageFailed(last[-1][:300], out.stderr[-4000:])
  return json.loads(out.stdout.strip().splitlines()[-1])


def failed_row(spec: dict, error: StageFailed) -> dict:
  _log(f"  {spec.get('variant', spec.get('method'))} N={spec['tokens']:,} FAILED: {error.args[0]}")
  return {"method": spec["method"], "variant": spec.get("variant", spec["method"]),
          "tokens": spec["tokens"], "status": "failed", "error": error.args[0],
          "traceback": error.args[1] if len(error.args) > 1 else ""}


# ------------------------------------------------------------------------------------------
# Extrapolation


def extrapolate(measured: list[dict], n: int, key: str) -> tuple[float, str]:
  """value(n) = a + b n through the two largest measured N (b = value/N through the origin
  when only one N was measured); returns the value and the arithmetic."""
  pts = sorted((r["tokens"], r[key]) for r in measured)
  if len(pts) == 1 or pts[-1][0] == pts[-2][0]:
    n0, v0 = pts[-1]
    return v0 * n / n0, f"{v0:.4g} x {_fmt_n(n)}/{_fmt_n(n0)}"
  (n1, v1), (n2, v2) = pts[-2], pts[-1]
  b = (v2 - v1) / (n2 - n1)
  if b <= 0:
    return v2, f"{v2:.4g} (flat between N={_fmt_n(n1)} and {_fmt_n(n2)})"
  a = v1 - b * n1
  return a + b * n, (f"{a:.4g} + {b:.4g} x {_fmt_n(n)} (line through N={_fmt_n(n1)}: {v1:.4g}"
                     f", N={_fmt_n(n2)}: {v2:.4g})")


def extrapolated_row(method: str, variant: str, n: int, measured: list[dict], why: str,
                     examples: int) -> dict:
  q, q_how = extrapolate(measured, n, "query_s")
  p, p_how = extrapolate(measured, n, "prepare_s")
  b, b_how = extrapolate(measured, n, "stored_bytes")
  if method in ("ekfac", "graddot"):  # state does not grow with N: the measured size
    b, b_how = measured[-1]["stored_bytes"], "independent of N (measured)"
  if measured[-1].get("prepare_note", "").startswith("factors fitted"):
    # A fit on a sample says nothing of the fit over N: report the measured one as it is.
    p, p_how = measured[-1]["prepare_s"], f"not extrapolated ({measured[-1]['prepare_note']})"
  return {"method": method, "variant": variant, "tokens": n, "examples": examples,
          "status": "extrapolated", "query_s": q, "prepare_s": p, "stored_bytes": int(b),
          "peak_rss": None, "why": why,
          "note": f"query s = {q_how}; prepare s = {p_how}; bytes = {b_how}"}


# ------------------------------------------------------------------------------------------
# The run


@exit_on_user_error
def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  parser.add_argument("--quick", action="store_true",
                      help="tiny sizes, random-weight model, random tokens, in-process")
  parser.add_argument("--workdir", default="runs/bench/prism_tiny",
                      help="the trained prism_tiny run (trained here when it has no checkpoint)")
  parser.add_argument("--sizes", default=None,
                      help="comma-separated N (scored tokens); 'all' = whole train split")
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--queries", type=int, default=None, help="timed queries per method")
  parser.add_argument("--slow-queries", type=int, default=None,
                      help="timed queries for ekfac/graddot (each a backward over N tokens)")
  parser.add_argument("--direct-ekfac", type=float, default=None,
                      help="largest N at which EK-FAC is run (above: extrapolated)")
  parser.add_argument("--ekfac-fit-examples", type=int, default=16,
                      help="fit EK-FAC's factors on the first N examples (0: all); a query "
                           "still scores every example, so its time does not depend on N")
  parser.add_argument("--direct-graddot", type=float, default=None)
  parser.add_argument("--direct-influence", type=float, default=None)
  parser.add_argument("--direct-index", default=None,
                      help="largest N whose index is built ('all' for every N); above it the "
                      "prototype methods are extrapolated")
  parser.add_argument("--index-extra", default="",
                      help="extra N at which only the prototype methods are measured")
  parser.add_argument("--calibration", type=float, default=None,
                      help="extra smaller N for extrapolated methods (a measured slope)")
  parser.add_argument("--trak-examples", type=int, default=None,
                      help="real TRAK features at most this many examples (above: tiled)")
  parser.add_argument("--equal-bytes-tolerance", type=float, default=0.0,
                      help="reuse a cached TRAK row whose state is within this fraction of "
                      "single_pass's bytes (default 0: only the exact size)")
  parser.add_argument("--trak-bytes", default=None,
                      help="only measure TRAK sized to this many stored bytes at --sizes "
                      "(cached; see --equal-bytes-tolerance)")
  parser.add_argument("--blas-threads", type=int, default=0,
                      help="OPENBLAS/OMP/MKL_NUM_THREADS of the workers (0: the default). On a "
                      "shared machine a multi-threaded OpenBLAS spin-waits on small products")
  parser.add_argument("--cached-only", action="store_true",
                      help="measure nothing: report what <out>/cache holds (missing = marked)")
  parser.add_argument("--remeasure", action="store_true",
                      help="measure again what <out>/cache/rows already holds")
  parser.add_argument("--index-only", action="store_true",
                      help="only build (cache) the indexes of --sizes, e.g. beside a run")
  parser.add_argument("--out", default=None)
  parser.add_argument("attr", nargs="*", metavar="attr.key=value")
  args = parser.parse_args(argv)
  if args.worker:
    print(json.dumps(WORKERS[json.loads(args.worker)["stage"]](json.loads(args.worker))))
    return
  global CACHED_ONLY
  CACHED_ONLY = args.cached_only
  q = args.quick
  d = lambda value, full, quick: value if value is not None else (quick if q else full)
  args.sizes = d(args.sizes, "100000,1000000,all", "300,900")
  args.queries = d(args.queries, 5, 2)
  args.slow_queries = d(args.slow_queries, 3, 1)
  args.direct_ekfac = int(d(args.direct_ekfac, 1e5, 300))
  args.direct_graddot = int(d(args.direct_graddot, 1e5, 300))
  args.direct_influence = int(d(args.direct_influence, 1e6, 300))
  args.calibration = int(d(args.calibration, 2e4, 0))
  args.direct_index = d(args.direct_index, "all", "all")
  args.trak_examples = d(args.trak_examples, 16, 8)
  args.out = d(args.out, "runs/bench", "runs/bench/quick")
  _check_arguments(args)
  if q:
    args.attr = ["attr.trak_projection_dim=16", "attr.batch_size=8", *args.attr]
  run_benchmark(args)


def _check_arguments(args) -> None:
  """One line for a bad --sizes, --direct-index, --index-extra or --methods, before any
  training or indexing (each can take an hour)."""
  for flag, text in (("--sizes", args.sizes), ("--direct-index", args.direct_index),
                     ("--index-extra", args.index_extra)):
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if flag == "--sizes" and not items:
      raise UserError("--sizes names no N: give scored-token counts such as 100000,all")
    for item in items:
      try:
        ok = item == "all" or int(float(item)) >= 1
      except (ValueError, OverflowError):
        ok = False
      if not ok:
        raise UserError(f"{flag} {text}: {item!r} is neither a token count >= 1 nor 'all'")
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  unknown = [m for m in methods if m not in METHODS]
  if unknown or not methods:
    raise UserError(f"--methods {args.methods!r}: choose from {', '.join(METHODS)}")


def _checkpoint_key(workdir: str) -> str:
  """A digest of the checkpoint files (names, sizes, mtimes): cached indexes follow it."""
  h = hashlib.sha1()
  for root, _, files in sorted(os.walk(os.path.join(workdir, "checkpoints"))):
    for f in sorted(files):
      st = os.stat(os.path.join(root, f))
      h.update(f"{os.path.relpath(os.path.join(root, f), workdir)}:{st.st_size}:"
               f"{int(st.st_mtime)}".encode())
  return h.hexdigest()[:10]


def ensure_trained(workdir: str):
  """Trains (or finishes training) the benchmarked model when its last step is missing."""
  import experiments
  want = experiments.get(EXP).train.steps
  ckpt = os.path.join(workdir, "checkpoints")
  steps = [int(s) for s in os.listdir(ckpt) if s.isdigit()] if os.path.isdir(ckpt) else []
  if steps and max(steps) >= want:
    return
  _log(f"{workdir} has no step-{want} checkpoint: training {EXP} ({want} steps, resuming "
       "when possible; 10-40 min on 2 cores)")
  subprocess.run([sys.executable, "-m", "prism_jax.main.train", "--exp", EXP, "--workdir",
                  workdir, "train.progress=false"], check=True)


def run_benchmark(args):
  import numpy as np
  started_all = time.perf_counter()
  quick = args.quick
  cache = os.path.join(args.out, "cache")
  os.makedirs(cache, exist_ok=True)
  if not quick:
    ensure_trained(args.workdir)
  # The stream (every document of the train split, in order) and the validation queries.
  stream_path = os.path.join(cache, "stream_quick.npz" if quick else "stream.npz")
  if not os.path.exists(stream_path):
    if quick:
      stream = _stream_quick()
    else:
      import experiments
      stream = _stream_corpus(experiments.get(EXP))
    outputs.write_npz(stream_path, stream)  # whole, then renamed
  with np.load(stream_path) as f:
    stream = {k: f[k] for k in f.files}
  total = scored_total(stream)
  sizes = sorted({min(_size(s.strip(), total), total) for s in args.sizes.split(",")})
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  key = "quick" if quick else _checkpoint_key(args.workdir)
  spec0 = {"quick": quick, "workdir": args.workdir, "stream": stream_path, "attr": args.attr,
           "queries": args.queries, "blas_threads": args.blas_threads}
  if quick:
    model = "random-weight PRISM (V=256, d=32, 1 layer, 32 prototypes, k=4) - NOT TRAINED"
  else:
    with open(os.path.join(args.workdir, "config.json")) as f:
      run_cfg = json.load(f)
    steps = sorted(int(s) for s in os.listdir(os.path.join(args.workdir, "checkpoints"))
                   if s.isdigit())
    model = (f"{EXP} trained {steps[-1]} steps on the embedded corpus ({args.workdir}; "
             f"d={run_cfg['model']['d_model']}, {run_cfg['model']['num_layers']} layers, "
             f"V={run_cfg['model']['vocab_size']}, M={run_cfg['prototypes']['num_prototypes']}"
             f", k={run_cfg['prototypes']['top_k']})")
  label = {"model": model, "data": str(stream["source"]),
           "queries": (f"{args.queries} timed next-token queries at seeded positions of "
                       f"validation passages (1 warm-up first); ekfac/graddot/trak "
                       f"{args.slow_queries}" if not quick else
                       f"{args.queries} timed queries from random rows (synthetic)"),
           "machine": (f"{os.cpu_count()}-core CPU"
                       + (f", shared (load average {os.getloadavg()[0]:.1f} at start)")),
           "process": ("one fresh process per measurement" if not quick else "in-process")
                      + (f", numpy BLAS threads {args.blas_threads}" if args.blas_threads else
                         ", numpy BLAS threads: OpenBLAS default"),
           "total_scored_tokens": total}
  _log(f"attribution benchmark: {label['model']}\n  data: {label['data']}\n"
       f"  machine: {label['machine']}; sizes {sizes}")
  rows = []
  if args.trak_bytes:  # TRAK sized to given bytes (e.g. single_pass's, predicted) only
    for n in sizes:
      spec = {**spec0, "stage": "measure", "method": "trak", "tokens": n, "dim": None,
              "equal_bytes": int(float(args.trak_bytes)), "trak_examples": args.trak_examples,
              "variant": "trak@single_pass_bytes", "queries": args.slow_queries}
      _print_row(measure_cached(spec, cache, key, quick, True))
    return None
  if args.index_only:
    for n in sizes:
      _ensure_index(spec0, cache, key, n, n <= args.direct_influence, quick)
    return None
  cap = {"ekfac": args.direct_ekfac, "graddot": args.direct_graddot,
         "influence": args.direct_influence}
  index_cap = _size(str(args.direct_index), total)
  for m in ("single_pass", "prototype"):
    cap[m] = index_cap
  cap["influence"] = min(cap["influence"], index_cap)
  # Extrapolated methods are also measured at a smaller calibration N (two measured points).
  index_extra = {min(_size(x.strip(), total), total) for x in args.index_extra.split(",")
                 if x.strip()} if args.index_extra else set()
  measured_at = lambda m: set(sizes) | (index_extra if m in INDEX_METHODS else set())
  needs_calibration = [m for m in ("ekfac", "graddot", "influence")
                       if m in methods and any(n > cap[m] for n in sizes)
                       and sum(n <= cap[m] for n in measured_at(m)) < 2]
  calibration = {args.calibration} if needs_calibration and args.calibration else set()
  built = {}  # N -> index folder (single_pass side by side at the end)
  for n in sorted(set(sizes) | calibration | index_extra):
    calib_only = n not in sizes
    todo = methods if not calib_only else (
        (needs_calibration if n in calibration else [])
        + [m for m in INDEX_METHODS if m in methods and n in index_extra])
    index, index_error = None, None
    if any(m in INDEX_METHODS for m in todo) and n <= index_cap:
      try:
        index = _ensure_index(spec0, cache, key, n,
                              n <= cap["influence"] and "influence" in todo, quick)
        built[n] = index["dir"]
      except StageFailed as e:
        index_error = e
    by = {}
    for method in todo:
      spec = {**spec0, "stage": "measure", "method": method, "tokens": n}
      if method in cap and n > cap[method]:
        measured = [r for r in rows if r["variant"] == method and r["status"] == "measured"]
        if not measured:
          rows.append(failed_row(spec, StageFailed("no measured N to extrapolate from")))
          continue
        why = {"ekfac": "a query recomputes every training gradient (a backward over N tokens)",
               "graddot": "a query recomputes every training gradient (a backward over N tokens)",
               "influence": "stores g_t [N, D] float32 and scans every posting"}.get(method)
        if n > index_cap and method in INDEX_METHODS:
          built = max(measured, key=lambda r: r["tokens"])
          rate = built["tokens"] / max(built["prepare_s"], 1e-9)
          why = (f"its index is not built here (N above --direct-index): at the measured "
                 f"build rate, {rate:,.0f} tokens/s at N={_fmt_n(built['tokens'])}, it "
                 f"would take {n / rate / 3600:.1f} h on this machine")
        examples = (index["num_examples"] if method in INDEX_METHODS and index else
                    len(prefix_documents(stream, n)) if method in INDEX_METHODS else
                    measured[-1]["examples"] * n // measured[-1]["tokens"])
        row = extrapolated_row(method, method, n, measured, why, examples)
        rows.append(row)
        by[method] = row
        _print_row(row)
        continue
      if method in ("ekfac", "graddot"):
        spec["queries"] = args.slow_queries
      if method == "ekfac" and args.ekfac_fit_examples:
        spec["extra_attr"] = [f"attr.ekfac_fit_examples={args.ekfac_fit_examples}"]
      if method in INDEX_METHODS:
        if index is None:
          rows.append(failed_row(spec, index_error))
          continue
        spec.update(index_dir=index["dir"], index_seconds=index["seconds"])
      if method == "trak":
        spec.update(trak_examples=args.trak_examples,
                    dim=attr_config(spec0).trak_projection_dim)
      if method == "trak":
        spec["queries"] = args.slow_queries
      try:
        row = measure_cached(spec, cache, key, quick, args.remeasure)
      except StageFailed as e:
        rows.append(failed_row(spec, e))
        continue
      if calib_only:
        row["calibration"] = True
      rows.append(row)
      by[method] = row
      _print_row(row)
    if "trak" in methods and "single_pass" in by and not calib_only:
      spec = {**spec0, "stage": "measure", "method": "trak", "tokens": n, "dim": None,
              "equal_bytes": by["single_pass"]["stored_bytes"],
              "trak_examples": args.trak_examples, "variant": "trak@single_pass_bytes",
              "queries": args.slow_queries, "tolerance": args.equal_bytes_tolerance}
      try:
        row = measure_cached(spec, cache, key, quick, args.remeasure)
        row["variant"] = "trak@single_pass_bytes"
        rows.append(row)
        _print_row(row)
      except StageFailed as e:
        rows.append(failed_row(spec, e))
  side = None
  if "single_pass" in methods and len(built) >= 2:
    try:
      side = call({**spec0, "stage": "side_by_side", "queries": args.queries,
                   "repeats": 3, "indexes": {str(n): d for n, d in sorted(built.items())}},
                  quick)
      side["slope"] = _slope([(r["tokens"], r["query_s"]) for r in side["rows"]])
      side["slope_last"] = _slope([(r["tokens"], r["query_s"]) for r in side["rows"][-2:]])
    except StageFailed as e:
      _log(f"  single_pass side by side FAILED: {e.args[0]}")
  result = {"label": label, "sizes": sizes, "rows": rows, "ratios": ratios(rows, sizes),
            "slopes": slopes(rows), "side_by_side": side,
            "seconds": time.perf_counter() - started_all,
            "targets": {"ekfac_over_single_pass_at_1e6": 500, "trak_over_single_pass_at_1e6": 3,
                        "single_pass_slope": 0.0}}
  os.makedirs(args.out, exist_ok=True)
  outputs.write_json(os.path.join(args.out, "attribution.json"), result)
  table = report(result)
  with open(os.path.join(args.out, "attribution.md"), "w") as f:
    f.write(table)
  print(table)
  plot(result, os.path.join(args.out, "attribution_speed.png"))
  _log(f"benchmark took {result['seconds']:.0f} s")
  return result


def _ensure_index(spec0, cache, key, n, influence, quick) -> dict:
  """The cached index of the first n tokens (built when missing)."""
  from prism_jax.attribution.index import FORMAT
  from prism_jax.attribution.indexing import CONTENT_KNOBS
  # The index follows the checkpoint, the format and the attr.* settings it was built with
  # (those that change its content: a query-time knob reuses it).
  content = [a for a in spec0["attr"]
             if a.split("=")[0].strip().removeprefix("attr.") in CONTENT_KNOBS]
  tag = hashlib.sha1(json.dumps([FORMAT, content]).encode()).hexdigest()[:6]
  name = f"index_{key}_{tag}_N{n}" + ("_g" if influence else "")
  folder = os.path.join(cache, name)
  meta = os.path.join(cache, name + ".build.json")
  lock = os.path.join(cache, name + ".lock")
  if not influence and os.path.exists(os.path.join(cache, name + "_g.lock")):
    lock = os.path.join(cache, name + "_g.lock")  # the build with g_t serves this one too
  while os.path.exists(lock) and _alive(lock):  # another run (--index-only) is building it
    if CACHED_ONLY:
      raise StageFailed("not measured (--cached-only: its index is still being built)")
    time.sleep(10)
  if not (os.path.exists(meta) and os.path.exists(os.path.join(folder, "manifest.json"))):
    if not influence:  # an index with g_t serves every method too
      with_g = os.path.join(cache, name + "_g.build.json")
      if os.path.exists(with_g):
        with open(with_g) as f:
          return json.load(f)
    if CACHED_ONLY:
      raise StageFailed("not measured (--cached-only: its index is not built)")
    _log(f"  building the index of N={_fmt_n(n)} tokens{' (with g_t)' if influence else ''}")
    with open(lock, "w") as f:
      f.write(str(os.getpid()))
    try:
      info = call({**spec0, "stage": "index", "tokens": n, "index_dir": folder,
                   "influence": influence}, quick)
    finally:
      os.remove(lock)
    info["dir"] = folder
    outputs.write_json(meta, info)  # whole, then renamed: a kill leaves no half a record
    _log(f"  index: {info['seconds']:.1f} s, peak {info['peak_rss'] / 2**20:.0f} MiB, "
         f"single_pass {info['bytes_by_method']['single_pass']:,} bytes")
  with open(meta) as f:
    return json.load(f)


def measure_cached(spec: dict, cache: str, key: str, quick: bool, remeasure: bool) -> dict:
  """A measurement, reused from <cache>/rows/ when the same one (checkpoint, method, N,
  queries, settings) was made before: parallel or interrupted runs fill the table in parts."""
  what = {k: spec.get(k) for k in ("method", "variant", "tokens", "queries", "attr", "dim",
                                   "equal_bytes", "trak_examples", "index_seconds")}
  if spec.get("extra_attr"):
    what["extra_attr"] = spec["extra_attr"]
  if spec.get("blas_threads"):
    what["blas_threads"] = spec["blas_threads"]
  digest = hashlib.sha1(json.dumps(what, sort_keys=True).encode()).hexdigest()[:10]
  path = os.path.join(cache, "rows", f"{key}_{spec.get('variant', spec['method'])}_"
                      f"N{spec['tokens']}_{digest}.json")
  if os.path.exists(path) and not remeasure and not quick:
    with open(path) as f:
      row = json.load(f)
    row["cached"] = True
    return row
  if spec.get("equal_bytes") and not remeasure and not quick:
    # TRAK sized to bytes within --equal-bytes-tolerance of the wanted ones (e.g. measured
    # beside the index build from its predicted size); the bytes ratio is reported.
    prefix = f"{key}_{spec['variant']}_N{spec['tokens']}_"
    folder = os.path.join(cache, "rows")
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
      if name.startswith(prefix):
        with open(os.path.join(folder, name)) as f:
          row = json.load(f)
        if (row.get("queries") == spec["queries"] and abs(
            row["stored_bytes"] / spec["equal_bytes"] - 1) <= spec.get("tolerance", 0)):
          row["cached"] = True
          return row
  if CACHED_ONLY:
    raise StageFailed("not measured (--cached-only: no cached measurement)")
  row = call(spec, quick)
  row["queries"] = spec["queries"]
  outputs.write_json(path, row)  # whole, then renamed: a kill leaves no half a row
  return row


def _alive(lock: str) -> bool:
  try:
    with open(lock) as f:
      os.kill(int(f.read().strip()), 0)
    return True
  except (OSError, ValueError):
    return False


def _print_row(r):
  peak = f"{r['peak_rss'] / 2**20:6.0f}MiB" if r.get("peak_rss") else "     n/a"
  _log(f"  {r['variant']:24s} N={r['tokens']:>9,d} {r['status']:12s} query "
       f"{r['query_s'] * 1e3:12.2f} ms  state {r['stored_bytes']:>13,d} B  prepare "
       f"{r['prepare_s']:9.1f} s  peak {peak}" + (f"  [{r['note']}]" if r.get("note") else ""))


def _row(rows, variant, n):
  hits = [r for r in rows if r["variant"] == variant and r["tokens"] == n
          and not r.get("calibration") and r["status"] != "failed"]
  return hits[0] if hits else None


def ratios(rows, sizes) -> list[dict]:
  """Per N: baseline query time / single_pass query time (x faster)."""
  out = []
  for n in sizes:
    sp = _row(rows, "single_pass", n)
    if sp is None:
      continue
    entry = {"tokens": n, "single_pass_s": sp["query_s"], "single_pass_bytes": sp["stored_bytes"]}
    for variant in ("ekfac", "trak@single_pass_bytes", "trak", "graddot", "influence",
                    "prototype"):
      r = _row(rows, variant, n)
      if r is not None:
        entry[variant] = {"speedup": r["query_s"] / sp["query_s"], "status": r["status"],
                          "query_s": r["query_s"], "stored_bytes": r["stored_bytes"],
                          "bytes_ratio": r["stored_bytes"] / max(sp["stored_bytes"], 1),
                          "dim": r.get("dim")}
    out.append(entry)
  return out


def _slope(pts) -> float | None:
  import numpy as np
  pts = [(n, t) for n, t in pts if t > 0]
  if len(pts) < 2:
    return None
  x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
  return float(np.polyfit(x, y, 1)[0])


def slopes(rows) -> dict:
  """Least-squares slope of log(query s) in log(N): all points and measured points only."""
  out = {}
  for variant in dict.fromkeys(r["variant"] for r in rows if r["status"] != "failed"):
    mine = [r for r in rows if r["variant"] == variant and r["status"] != "failed"]
    out[variant] = {
        "all": _slope([(r["tokens"], r["query_s"]) for r in mine]),
        "measured": _slope([(r["tokens"], r["query_s"]) for r in mine
                            if r["status"] != "extrapolated"])}
  return out


def _ms(s: float) -> str:
  ms = s * 1e3
  return f"{ms:,.0f}" if ms >= 100 else f"{ms:.3g}"


def _x(v: float) -> str:
  return f"{v:,.0f}x" if v >= 100 else f"{v:.3g}x"


def report(result) -> str:
  label, rows = result["label"], result["rows"]
  lines = [
      "Attribution speed and stored bytes",
      "",
      f"- model: {label['model']}",
      f"- data (N = first N scored tokens of the training stream): {label['data']}",
      f"- queries: {label['queries']}",
      f"- machine: {label['machine']}; {label['process']}",
      "",
      "| method | N tokens | examples | status | query ms | stored bytes | bytes / token | "
      "prepare s | peak MiB |",
      "|---|---|---|---|---|---|---|---|---|"]
  for r in sorted(rows, key=lambda r: (METHODS.index(r["method"]), r["variant"], r["tokens"])):
    if r["status"] == "failed":
      lines.append(f"| {r['variant']} | {_fmt_n(r['tokens'])} | - | FAILED: "
                   f"{r['error'].replace('|', '/')} | - | - | - | - | - |")
      continue
    peak = f"{r['peak_rss'] / 2**20:,.0f}" if r.get("peak_rss") else "-"
    status = r["status"] + (" (extra N)" if r.get("calibration") else "")
    name = r["variant"] + (f" (dim {r['dim']})" if r.get("dim") else "")
    lines.append(f"| {name} | {_fmt_n(r['tokens'])} | {_fmt_n(r['examples'])} | {status} | "
                 f"{_ms(r['query_s'])} | {_fmt_n(r['stored_bytes'])} | "
                 f"{r['stored_bytes'] / r['tokens']:.1f} | {r['prepare_s']:,.1f} | {peak} |")
  lines += ["", "Query-time ratio (baseline / single_pass: how many times faster single_pass "
            "answers; TRAK at equal stored bytes = projection sized so its state equals "
            "single_pass's index bytes at that N):", "",
            "| N tokens | single_pass ms | single_pass bytes | EK-FAC / single_pass | "
            "TRAK @ equal bytes / single_pass | TRAK (dim 256) / single_pass | "
            "graddot / single_pass | influence / single_pass |",
            "|---|---|---|---|---|---|---|---|"]
  for e in result["ratios"]:
    def cell(v):
      if v not in e:
        return "-"
      c = e[v]
      extra = f", dim {c['dim']}" if c.get("dim") and v.startswith("trak") else ""
      if v == "trak@single_pass_bytes":
        extra += f", {c['bytes_ratio']:.3f}x the bytes"
      flag = f" ({c['status']}{extra})" if c["status"] != "measured" or extra else ""
      return _x(c["speedup"]) + flag
    lines.append(f"| {_fmt_n(e['tokens'])} | {_ms(e['single_pass_s'])} | "
                 f"{_fmt_n(e['single_pass_bytes'])} | {cell('ekfac')} | "
                 f"{cell('trak@single_pass_bytes')} | {cell('trak')} | {cell('graddot')} | "
                 f"{cell('influence')} |")
  lines += ["", "Log-log slope of query time in N (0 = flat, 1 = linear):", "",
            "| method | slope, all N | slope, measured N only |", "|---|---|---|"]
  for variant, s in result["slopes"].items():
    f = lambda v: "-" if v is None else f"{v:+.2f}"
    lines.append(f"| {variant} | {f(s['all'])} | {f(s['measured'])} |")
  side = result.get("side_by_side")
  if side:
    f = lambda v: "-" if v is None else f"{v:+.2f}"
    first = side["rows"][0]["query_s"]
    lines += ["", f"single_pass side by side: every index open in one process, each query run "
              f"on every N in turn ({side['queries']} queries x {side['repeats']} rounds, "
              "median), so load falls on every N alike. A query reads its k prototype "
              "lists and its target's list (at most k T + T' postings); the scoring work "
              "follows the distinct positions among them:", "",
              "| N tokens | query ms | vs smallest N | postings read | distinct positions |",
              "|---|---|---|---|---|"]
    for r in side["rows"]:
      lines.append(f"| {_fmt_n(r['tokens'])} | {_ms(r['query_s'])} | "
                   f"{r['query_s'] / first:.2f}x | {r['postings_read']:,.0f} | "
                   f"{r['distinct_positions']:,.0f} |")
    lines += ["", f"Log-log slope of that query time in N: {f(side['slope'])} over every N, "
              f"{f(side['slope_last'])} between the two largest."]
  notes = [r for r in rows if r.get("note") or r.get("prepare_note", "").startswith("factors")]
  if notes:
    lines += ["", "Extrapolated and tiled rows (how each figure was obtained):", ""]
    for r in notes:
      why = f" ({r['why']})" if r.get("why") else ""
      prep = f"; prepare {r['prepare_note']}" if r.get("prepare_note", "").startswith(
          ("extrapolated", "factors")) else ""
      lines.append(f"- {r['variant']} at N={_fmt_n(r['tokens'])}, {r['status']}{why}: "
                   f"{r.get('note', 'query timed on every example')}{prep}")
  cached = [r for r in rows if r.get("cached")]
  lines += ["", f"Whole benchmark: {result['seconds']:.0f} s"
            + (f" ({len(cached)} of {len(rows)} rows reused from earlier runs' measurements in "
               "<out>/cache/rows; their own times are in the rows)." if cached else ".")]
  return "\n".join(lines) + "\n"


def plot(result, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = result["rows"]
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for variant in dict.fromkeys(r["variant"] for r in rows if r["status"] != "failed"):
    pts = sorted((r["tokens"], r["query_s"], r["status"]) for r in rows
                 if r["variant"] == variant and r["status"] != "failed")
    line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], label=variant)
    for n, t, status in pts:
      ax.plot([n], [t], marker="o", color=line.get_color(),
              markerfacecolor="none" if status == "extrapolated" else line.get_color())
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("training tokens N (scored)")
  ax.set_ylabel("seconds per query (warm, median)")
  ax.set_title(f"{result['label']['model'][:70]}\n{result['label']['machine']} "
               "(hollow = extrapolated)", fontsize=7)
  ax.legend(fontsize=7)
  fig.tight_layout()
  outputs.write_figure(path, fig, dpi=120)
  _log(f"wrote {path}")


if __name__ == "__main__":
  main()
