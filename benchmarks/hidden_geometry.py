"""The geometry behind a collapsing bank: how many directions the hidden states use, and
which prototypes the top-k picks, at a run's checkpoints (docs/evaluate.md, round six).

  python -m benchmarks.hidden_geometry --exp prism_small --workdir runs/x --steps 0 50 100
                                       [--batches 4]

Step 0 is the run's initialisation (its seed), recomputed; other steps are its checkpoints.
Per step, on `--batches` validation batches (the loss-masked positions):

- participation ratio of h's covariance, (sum lambda)^2 / sum lambda^2: the number of
  directions its variance effectively spans (D when isotropic), and the top-1 / top-5
  eigenvalue shares;
- |mean h|^2 / E|h|^2: the share of h's energy common to every token;
- PRISM only: the fraction of prototypes no position selected, the share of the top-k
  slots the 10 busiest take, and the rank correlation of a prototype's use with (a) its
  score's common part mean(h) . P_j / tau and (b) its token-dependent spread
  std_t((h_t - mean h) . P_j) / tau. A bank whose use follows (b) hands the slots to the keys
  that lie along the few directions h varies in.
These read the raw h; a head that whitens its scores selects on (h - mu) W instead.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from prism_jax.errors import UserError, exit_on_user_error
from prism_jax.models import lm
from prism_jax.run import Run
from prism_jax.training import corpus_data


def _rank_correlation(a, b) -> float:
  ranks = lambda x: np.argsort(np.argsort(x)).astype(np.float64)
  return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def geometry(graphdef, params, batches, top_k: int | None) -> dict:
  forward = jax.jit(lambda p, b: lm.forward(graphdef, p, b))
  hidden, selected = [], []
  for batch in batches:
    out = forward(params, batch)
    scored = np.asarray(batch["loss_mask"]).reshape(-1) > 0
    d = out.hidden.shape[-1]
    hidden.append(np.asarray(out.hidden, np.float64).reshape(-1, d)[scored])
    if out.prototypes is not None:
      ids = np.asarray(out.prototypes.top_indices).reshape(-1, top_k)[scored]
      weights = np.asarray(out.prototypes.top_values).reshape(-1, top_k)[scored]
      selected.append(np.where(weights > 0, ids, -1))
  h = np.concatenate(hidden)
  mean = h.mean(0)
  centred = h - mean
  eigvals = np.linalg.eigvalsh(centred.T @ centred / len(h))[::-1]
  result = {"participation_ratio": eigvals.sum() ** 2 / np.sum(eigvals ** 2),
            "dimension": h.shape[1],
            "top1_share": eigvals[0] / eigvals.sum(),
            "top5_share": eigvals[:5].sum() / eigvals.sum(),
            "common_energy": mean @ mean / np.mean(np.sum(h * h, 1))}
  if selected:
    head = params["prototype_head"]
    keys = np.asarray(head["keys"], np.float64)
    tau = float(np.exp(np.asarray(head["log_temperature"])))
    ids = np.concatenate(selected).reshape(-1)
    usage = np.bincount(ids[ids >= 0], minlength=keys.shape[0])
    busiest = np.sort(usage)[::-1]
    result.update({
        "unused": float(np.mean(usage == 0)),
        "busiest10_share": busiest[:10].sum() / max(busiest.sum(), 1),
        "use_vs_common_score": _rank_correlation(usage, keys @ mean / tau),
        "use_vs_token_spread": _rank_correlation(usage, np.std(centred @ keys.T, 0) / tau),
    })
  return result


@exit_on_user_error
def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--exp", required=True)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--steps", type=int, nargs="+", required=True)
  parser.add_argument("--batches", type=int, default=4)
  args = parser.parse_args(argv)
  if min(args.steps) < 0 or args.batches < 1:
    raise UserError("--steps must be checkpoint steps >= 0 (0: the initialisation) and "
                    "--batches at least 1")
  with Run.open(args.exp, args.workdir) as run:
    cfg = run.cfg
    # every checkpoint first: a missing one is refused before the data is read
    states = [lm.init(cfg, cfg.train.seed)[:2] if step == 0 else run.params(step)[:2]
              for step in args.steps]
    batches = list(corpus_data(cfg).eval_batches())[:args.batches]
    top_k = cfg.prototypes.top_k if cfg.model.head == "prism" else None
    print(f"{cfg.name} in {args.workdir}: {len(batches)} validation batches")
    for step, (graphdef, params) in zip(args.steps, states):
      g = geometry(graphdef, params, batches, top_k)
      line = (f"step {step:>5}: participation ratio {g['participation_ratio']:.1f} of "
              f"{g['dimension']}, top-1/top-5 share {g['top1_share']:.2f}/{g['top5_share']:.2f}, "
              f"common energy {g['common_energy']:.2f}")
      if "unused" in g:
        line += (f" | unused {g['unused']:.2f}, busiest 10 {g['busiest10_share']:.3f}, "
                 f"use~common score {g['use_vs_common_score']:+.2f}, "
                 f"use~token spread {g['use_vs_token_spread']:+.2f}")
      print(line, flush=True)


if __name__ == "__main__":
  main()
