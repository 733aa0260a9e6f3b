"""Attribution speed at equal memory: `python -m benchmarks.attribution`.

Every method on the same model, data and thread count (one fresh process per measurement,
same environment): time to prepare (index / factors / projected features), time per query
once warm (median of --queries calls after one warm-up), peak resident memory of the
process (VmHWM), and bytes of stored attribution state. N is the number of training TOKENS
(scored positions): N/seq_len examples of seq_len positions. TRAK, whose state is sized
by its projection, is also run at the stored bytes of the prototype index and of the
influence index. The model is a small PRISM model (and its dense twin for the post-hoc
baselines) at random initialisation: speed does not depend on training.
Writes runs/bench/attribution.json, a markdown table and a log-log plot of query time vs N.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

BENCH_OVERRIDES = [
    "model.vocab_size=256", "model.d_model=64", "model.d_ff=128", "model.num_layers=2",
    "model.num_heads=4", "data.seq_len=64", "model.max_seq_len=64",
    "prototypes.num_prototypes=64", "prototypes.top_k=4", "train.progress=false",
]


def _rss(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field):
        return int(line.split()[1]) * 1024
  return 0


def worker(head: str, method: str, tokens: int, queries: int, attr_overrides: list[str]):
  import numpy as np

  import experiments
  from prism_jax.attribution import common, run
  from prism_jax.attribution.config import AttributionConfig, apply_overrides as attr_apply
  from prism_jax.config import apply_overrides
  from prism_jax.models import lm

  cfg = apply_overrides(experiments.get("prism_tiny"), BENCH_OVERRIDES + [f"model.head={head}"])
  attr = attr_apply(AttributionConfig(batch_size=16), attr_overrides)
  graphdef, params = lm.init(cfg, 0)
  length = cfg.data.seq_len
  rng = np.random.default_rng(0)
  examples = max(1, -(-tokens // length))  # ceil: at least N scored positions
  train = common.from_rows(rng.integers(0, cfg.model.vocab_size, (examples, length + 1)))
  held = common.from_rows(rng.integers(0, cfg.model.vocab_size, (queries + 1, length + 1)))
  qs = [common.query_from_example(held, i, int(rng.integers(8, length))) for i in
        range(queries + 1)]
  import tempfile
  base_rss = _rss("VmRSS")
  started = time.perf_counter()
  prepared = run.prepare(method, cfg, graphdef, params, train, attr,
                         index_dir=os.path.join(tempfile.mkdtemp(), "index"))
  prepare_s = time.perf_counter() - started
  prepared.query(qs[0])  # warm-up: compilation
  times = []
  for q in qs[1:]:
    started = time.perf_counter()
    prepared.query(q)
    times.append(time.perf_counter() - started)
  print(json.dumps({"head": head, "method": method, "tokens": train.num_tokens(),
                    "examples": examples, "prepare_s": prepare_s,
                    "query_s": statistics.median(times), "peak_rss": _rss("VmHWM"),
                    "rss_before_prepare": base_rss, "stored_bytes": prepared.stored_bytes,
                    "attr": attr_overrides}))


def measure(head, method, tokens, queries, attr_overrides=()):
  cmd = [sys.executable, "-m", "benchmarks.attribution", "--worker", head, method, str(tokens),
         "--queries", str(queries), *attr_overrides]
  out = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if out.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
  row = json.loads(out.stdout.strip().splitlines()[-1])
  print(f"  {head:6s} {method:10s} N={row['tokens']:>7d}  prepare {row['prepare_s']:8.3f}s  "
        f"query {row['query_s'] * 1e3:10.2f}ms  peak {row['peak_rss'] / 2**20:7.0f}MiB  "
        f"state {row['stored_bytes']:>11d}B {' '.join(attr_overrides)}", flush=True)
  return row


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--worker", nargs=3, metavar=("HEAD", "METHOD", "TOKENS"))
  parser.add_argument("--sizes", default="1000,10000,100000")
  parser.add_argument("--queries", type=int, default=3)
  parser.add_argument("--no-dense", action="store_true")
  parser.add_argument("--out", default="runs/bench")
  parser.add_argument("attr", nargs="*", metavar="attr.key=value")
  args = parser.parse_args(argv)
  if args.worker:
    head, method, tokens = args.worker
    return worker(head, method, int(tokens), args.queries, args.attr)
  print(f"attribution benchmark: {os.cpu_count()} CPUs, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  rows = []
  for tokens in [int(s) for s in args.sizes.split(",")]:
    by = {}
    for method in ("prototype", "influence", "trak", "ekfac", "graddot"):
      by[method] = measure("prism", method, tokens, args.queries, args.attr)
      rows.append(by[method])
    from prism_jax.attribution.trak import dim_for_bytes
    for ref in ("prototype", "influence"):
      dim = dim_for_bytes(by[ref]["stored_bytes"], by["trak"]["examples"])
      row = measure("prism", "trak", tokens, args.queries,
                    [*args.attr, f"attr.trak_projection_dim={dim}"])
      row["equal_bytes_to"] = ref
      rows.append(row)
    if not args.no_dense:
      for method in ("trak", "ekfac", "graddot"):
        rows.append(measure("dense", method, tokens, args.queries, args.attr))
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "attribution.json"), "w") as f:
    json.dump(rows, f, indent=1)
  table = report(rows)
  with open(os.path.join(args.out, "attribution.md"), "w") as f:
    f.write(table)
  print(table)
  plot(rows, os.path.join(args.out, "attribution_speed.png"))


def _label(r):
  label = f"{r['method']}" + ("" if r["head"] == "prism" else " (dense)")
  if "equal_bytes_to" in r:
    label += f" @ {r['equal_bytes_to']} bytes"
  return label


def report(rows) -> str:
  lines = ["| method | N tokens | prepare s | query ms | peak MiB | state bytes | "
           "query / prototype | query / influence |", "|" + "---|" * 8]
  for r in rows:
    ref = {x["method"]: x for x in rows if x["tokens"] == r["tokens"] and x["head"] == "prism"
           and "equal_bytes_to" not in x}
    lines.append(f"| {_label(r)} | {r['tokens']} | {r['prepare_s']:.3f} | "
                 f"{r['query_s'] * 1e3:.2f} | {r['peak_rss'] / 2**20:.0f} | {r['stored_bytes']} | "
                 f"{r['query_s'] / ref['prototype']['query_s']:.1f} | "
                 f"{r['query_s'] / ref['influence']['query_s']:.1f} |")
  return "\n".join(lines) + "\n"


def plot(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for label in dict.fromkeys(_label(r) for r in rows):
    pts = sorted((r["tokens"], r["query_s"]) for r in rows if _label(r) == label)
    ax.plot(*zip(*pts), marker="o", label=label)
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("training tokens N")
  ax.set_ylabel("seconds per query (warm)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
