"""Which training examples drive a token: `python -m prism_jax.attribute --prompt TEXT`.

  --method prototype   single forward pass over the prototype index (default)
  --method influence   influence restricted to the prototype head (per-prototype solves)
  --method ekfac|trak|graddot   post-hoc baselines (also on dense models)

The token is --target-token (its first piece) or, without it, the model's greedy next
token. Prints the top examples with scores and the token highlighted as [[token]]; --json
writes the same as JSON. prototype/influence read the index (`make index`); baselines
use the same training examples (attr.index_examples / attr.index_seed).
"""

from __future__ import annotations

import sys
import time

import jax
import numpy as np

from prism_jax import index as index_cli
from prism_jax import outputs
from prism_jax.attribution import common, index as index_lib, run
from prism_jax.errors import UserError, exit_on_user_error
from prism_jax.models import lm


def _flags(parser):
  parser.add_argument("--prompt", required=True, help="prompt text")
  parser.add_argument("--target-token", default=None,
                      help="token to explain (default: the model's greedy next token)")
  parser.add_argument("--method", default="prototype", choices=run.METHODS)
  parser.add_argument("--json", default=None, help="also write the result as JSON here")


def make_query(cfg, graphdef, params, tokenizer, prompt: str, target: str | None
               ) -> common.Query:
  ids = [tokenizer.bos_id, *tokenizer.encode(prompt)]
  if len(ids) > cfg.data.seq_len:
    raise UserError(f"the prompt is {len(ids)} tokens with BOS, longer than the attribution "
                    f"context of {cfg.data.seq_len} (data.seq_len)")
  if target is not None:
    pieces = tokenizer.encode(target)
    if not pieces:
      raise UserError(f"--target-token {target!r} encodes to no token")
    if len(pieces) > 1:
      print(f"note: --target-token {target!r} is {len(pieces)} tokens; explaining the first",
            file=sys.stderr)
    return common.Query(tuple(ids), int(pieces[0]))
  batch = common.Query(tuple(ids), 0).batch(cfg.data.seq_len)
  logits = lm.forward(graphdef, params, batch).logits[0, len(ids) - 1]
  return common.Query(tuple(ids), int(jax.device_get(logits.argmax())))


def _highlight_position(train: common.TrainingSet, example: int, best_token: int, tokens_pos,
                        target: int, span: int) -> int:
  """The scored position; for example-level methods the target's first occurrence."""
  if best_token >= 0:
    return int(tokens_pos[best_token])
  row, n = train.rows[example], int(train.lengths[example]) - 1
  hits = np.nonzero(row[1:n + 1] == target)[0]
  return int(hits[0]) if len(hits) else max(0, min(span, n - 1))  # else the opening


def results(prepared_scores, train, query, top: int, span: int, decode, token_positions):
  out = []
  for rank, e in enumerate(common.top_examples(prepared_scores.example_scores, top), 1):
    pos = _highlight_position(train, int(e), int(prepared_scores.best_token[e]),
                              token_positions, query.target, span)
    out.append({"rank": rank, "example": int(e), "example_id": int(train.example_ids[e]),
                "score": float(prepared_scores.example_scores[e]), "position": pos,
                "text": index_lib.span_text(train.rows[e], pos, span, decode)})
  return out


@exit_on_user_error
def main(argv=None):
  args = index_cli.parse(__doc__.splitlines()[0], _flags).parse_args(argv)
  opened, attr = index_cli.resolve(args)
  with opened:
    _attribute(args, opened, attr)


def _attribute(args, opened, attr):
  cfg, workdir = opened.cfg, opened.workdir
  graphdef, params, step = opened.params(args.step)
  tokenizer = opened.tokenizer()
  query = make_query(cfg, graphdef, params, tokenizer, args.prompt, args.target_token)
  index_dir = args.index or opened.index
  if args.method in run.PROTOTYPE_METHODS:
    index = index_cli.open_index(args, cfg, workdir, step)
    train = index.training_set()
    token_positions = index.array("tokens/position.npy")
  else:
    train, _ = index_cli.training_set(cfg, attr)
    token_positions = None
  started = time.perf_counter()
  prepared = run.prepare(args.method, cfg, graphdef, params, train, attr, index_dir=index_dir,
                         decode=tokenizer.decode, build_index=False)
  prepare_s = time.perf_counter() - started
  started = time.perf_counter()
  scores = prepared.query(query)
  query_s = time.perf_counter() - started
  found = results(scores, train, query, attr.top_examples, attr.span_tokens, tokenizer.decode,
                  token_positions)
  target_text = tokenizer.decode([query.target])
  print(f"{args.method}: top {len(found)} training examples for [[{target_text}]] after "
        f"{args.prompt!r} (prepare {prepare_s:.2f}s, query {query_s:.3f}s, "
        f"state {prepared.stored_bytes} bytes)")
  for r in found:
    print(f"{r['rank']:3d}. {r['score']:+.4g}  example {r['example_id']}: {r['text']}")
  if args.json:
    outputs.write_json(args.json, {
        "method": args.method, "prompt": args.prompt, "target_token": target_text,
        "target_id": query.target, "prepare_seconds": prepare_s, "query_seconds": query_s,
        "stored_bytes": prepared.stored_bytes, "results": found})


if __name__ == "__main__":
  main()
