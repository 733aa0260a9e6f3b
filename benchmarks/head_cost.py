"""Where the PRISM head's time goes, each part timed beside the dense unembedding it extends.

  python -m benchmarks.head_cost [--configs tiny] [--rounds 10] [--banks 256:8 1024:32]

For the config's batch (B x L tokens, width D, vocabulary V) and each bank size M with k
active: forward + backward of the dense unembedding with its cross-entropy (what the dense
twin's head costs), of the whole PRISM head (scores, top-k, mix, unembedding), and of its
parts on their own: the [B L, M] score product, the top-k, the k-row gather mix against
the dense [B L, M] x [M, D] mix. Printed as ratios to the dense unembedding (medians over
rounds), the figures to quote; the milliseconds are this machine's.

Last, per bank, the floor of any top-k head on this machine: the dense twin's whole train
step plus the score product and the top-k alone (no mix, no clustering terms, no backward
pass of either), as a ratio to that step. A PRISM train step cannot be cheaper than it.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import experiments
from benchmarks import common
from benchmarks.train_step import StepRunner
from prism_jax.config import PrototypeConfig
from prism_jax.errors import exit_on_user_error
from prism_jax.models import prism_head


def _median_ms(fn, *args, rounds: int) -> float:
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1e3


def measure(size: str, banks: list[tuple[int, int]], rounds: int) -> list[tuple[str, float]]:
  cfg = experiments.get(f"prism_{size}")
  b, l, d, v = cfg.data.batch_size, cfg.data.seq_len, cfg.model.d_model, cfg.model.vocab_size
  rng = np.random.default_rng(0)
  normal = lambda *shape, scale=1.0: jnp.asarray(rng.normal(scale=scale, size=shape), jnp.float32)
  h, emb = normal(b, l, d), normal(v, d, scale=0.02)
  targets = jnp.asarray(rng.integers(0, v, (b, l)))
  ce = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
  rows = [("dense unembedding", _median_ms(
      jax.grad(lambda h, e: ce(jnp.einsum("bld,vd->blv", h, e)), (0, 1)), h, emb,
      rounds=rounds))]
  for m, k in banks:
    keys, values = normal(m, d, scale=0.02), normal(m, d, scale=0.02)
    pcfg = PrototypeConfig(num_prototypes=m, top_k=k, similarity="dot")

    def head(h, keys, values, emb):
      logits, _ = prism_head.prototype_logits(h, keys, values, jnp.log(0.1), emb, pcfg,
                                              selection_bias_M=jnp.zeros((m,)))
      return ce(logits)

    scores = jnp.einsum("bld,md->blm", h, keys)
    ids = jnp.asarray(rng.integers(0, m, (b, l, k)))
    weights = jnp.asarray(rng.random((b, l, k)), jnp.float32)
    dense_act = jnp.zeros((b, l, m)).at[
        jnp.arange(b)[:, None, None], jnp.arange(l)[None, :, None], ids].set(weights)
    tag = f"M={m}, k={k}:"
    rows += [
        (f"{tag} whole PRISM head", _median_ms(jax.grad(head, (0, 1, 2, 3)), h, keys, values,
                                               emb, rounds=rounds)),
        (f"{tag} score product (forward)", _median_ms(
            lambda h, keys: jnp.einsum("bld,md->blm", h, keys), h, keys, rounds=rounds)),
        (f"{tag} top-k", _median_ms(lambda s: jax.lax.top_k(s, k), scores, rounds=rounds)),
        (f"{tag} gather mix (fwd+bwd)", _median_ms(jax.grad(
            lambda w, u: jnp.sum(prism_head.mix_selected_values(w, ids, u) ** 2), (0, 1)),
            weights, values, rounds=rounds)),
        (f"{tag} dense mix (fwd+bwd)", _median_ms(jax.grad(
            lambda a, u: jnp.sum(prism_head.mix_values(a, u) ** 2), (0, 1)),
            dense_act, values, rounds=rounds)),
    ]
  return rows


def dense_step_ms(size: str, rounds: int) -> float:
  """The dense twin's whole train step (milliseconds, median over rounds of 2 steps)."""
  runner = StepRunner(f"dense_{size}", [])
  return statistics.median(runner.run(2) for _ in range(rounds)) * 1e3


@exit_on_user_error
def main(argv=None):
  parser = common.parser(__doc__, rounds=10)
  parser.set_defaults(configs=["tiny"])
  parser.add_argument("--banks", nargs="+", default=["256:8", "1024:32"],
                      help="M:k pairs to time")
  args = parser.parse_args(argv)
  banks = []
  for spec in args.banks:
    try:
      m, k = (int(x) for x in spec.split(":"))
    except ValueError:
      raise SystemExit(f"error: --banks takes M:k pairs such as 1024:32, not {spec!r}")
    if not 1 <= k <= m:
      raise SystemExit(f"error: --banks {spec}: k must be in [1, M]")
    banks.append((m, k))
  print(f"PRISM head parts vs the dense unembedding, fwd+bwd unless marked "
        f"({common.devices()}, median of {args.rounds})")
  for size in args.configs:
    rows = measure(size, banks, args.rounds)
    base = rows[0][1]
    print(f"prism_{size}")
    for name, ms in rows:
      print(f"  {name:40} {ms:9.2f} ms  {ms / base:6.3f} x dense unembedding")
    step_ms = dense_step_ms(size, args.rounds)
    print(f"  {'dense_' + size + ' train step (whole)':40} {step_ms:9.2f} ms")
    part = dict(rows)
    for m, k in banks:
      floor = part[f"M={m}, k={k}: score product (forward)"] + part[f"M={m}, k={k}: top-k"]
      print(f"  M={m}, k={k}: floor (score product + top-k) {1 + floor / step_ms:6.3f} x the "
            f"dense step")


if __name__ == "__main__":
  main()
