"""Which training documents drive a token: `python -m prism_jax.main.attribute --prompt TEXT`.

  --method single_pass  (default) one forward pass + an O(k T) read of the index: the
                        head's influence through the unembedding, weighted by how alike
                        each position's prediction is to the query's, signed, summed over
                        a document's tokens (attr.single_pass_terms=values: through U)
  --method prototype    the prototype neighbourhoods (activation overlap, never negative)
  --method influence    the head influence through U from stored per-token gradients
  --method ekfac|trak|graddot   post-hoc baselines (also on dense models)

The token is --target-token (its first piece; ' and', with a space, is read as the text
after the prompt) or, without it, the model's greedy next token. Prints the top documents
with scores and the token highlighted as [[token]]; --json writes the same as JSON. The
index methods read the run's index (`make index`); the baselines score the passages'
openings (attr.index_examples / attr.index_seed), recomputing training gradients per query.
Why single_pass is the default: docs/attribution.md.
"""

from __future__ import annotations

import sys
import time

import jax
import numpy as np

from prism_jax import cli, outputs, run_index
from prism_jax.attribution import common, index as index_lib, run, service
from prism_jax.errors import UserError, exit_on_user_error
from prism_jax.models import lm

RESULT_FORMAT = "prism-attribution/1"  # the --json record (it replaces only one of these)


def _flags(parser):
  parser.add_argument("--prompt", required=True, type=cli.utf8_text, help="prompt text")
  parser.add_argument("--target-token", default=None, type=cli.utf8_text,
                      help="token to explain, as text after the prompt (' and' or 'and'; "
                           "default: the model's greedy next token)")
  parser.add_argument("--method", default=run.DEFAULT_METHOD, choices=run.METHODS)
  parser.add_argument("--json", default=None, help="also write the result as JSON here")


def encode_target(tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
  """(prompt ids after BOS, target ids). A space between them (' and', or a prompt ending
  in one) is read as running text, as the downstream tasks read a continuation: 'The king'
  + ' and' gives '▁and', not a bare '▁' piece then '▁and'. Otherwise the target is a word of
  its own ('and' gives '▁and', sentencepiece's word start)."""
  if target[:1].isspace() or prompt[-1:].isspace():
    from prism_jax import downstream

    context, continuation = downstream.encode_request(tokenizer, prompt, target)
    has_bos = downstream.special_id(tokenizer, "bos_id") is not None
    return context[1:] if has_bos else context, continuation
  return list(tokenizer.encode(prompt)), list(tokenizer.encode(target))


def make_query(cfg, graphdef, params, tokenizer, prompt: str, target: str | None
               ) -> common.Query:
  prompt_ids, pieces = (encode_target(tokenizer, prompt, target) if target is not None
                        else (tokenizer.encode(prompt), None))
  ids = [tokenizer.bos_id, *prompt_ids]
  if len(ids) > cfg.data.seq_len:
    raise UserError(f"the prompt is {len(ids)} tokens with BOS, longer than the attribution "
                    f"context of {cfg.data.seq_len} (data.seq_len)")
  if target is not None:
    if not pieces:
      raise UserError(f"--target-token {target!r} encodes to no token")
    if len(pieces) > 1:
      print(f"note: --target-token {target!r} is {len(pieces)} tokens; explaining the first",
            file=sys.stderr)
    return common.Query(tuple(ids), int(pieces[0]))
  batch = common.Query(tuple(ids), 0).batch(cfg.data.seq_len)
  logits = lm.forward(graphdef, params, batch).logits[0, len(ids) - 1]
  return common.Query(tuple(ids), int(jax.device_get(logits.argmax())))


def _highlight_position(train: common.TrainingSet, example: int, target: int, span: int) -> int:
  """For the baselines' example-level scores: the target's first occurrence, else the
  opening."""
  row, n = train.rows[example], int(train.lengths[example]) - 1
  hits = np.nonzero(row[1:n + 1] == target)[0]
  return int(hits[0]) if len(hits) else max(0, min(span, n - 1))


def results(prepared_scores, train, query, top: int, span: int, decode):
  out = []
  examples = prepared_scores.top(top)
  for rank, (e, value) in enumerate(zip(examples, prepared_scores.score_of(examples)), 1):
    pos = _highlight_position(train, int(e), query.target, span)
    out.append({"rank": rank, "example": int(e), "example_id": int(train.example_ids[e]),
                "score": float(value), "position": pos,
                "text": index_lib.span_text(train.rows[e], pos, span, decode)})
  return out


@exit_on_user_error
def main(argv=None):
  args = run_index.parse(__doc__.splitlines()[0], _flags).parse_args(argv)
  opened, attr = run_index.resolve(args)
  with opened:
    _attribute(args, opened, attr)


def _attribute(args, opened, attr):
  cfg = opened.cfg
  outputs.check_file_target(args.json, "--json", RESULT_FORMAT)
  graphdef, params, step = opened.params(args.step)
  tokenizer = opened.tokenizer()
  query = make_query(cfg, graphdef, params, tokenizer, args.prompt, args.target_token)
  index_dir = args.index or opened.index
  if args.method in run.PROTOTYPE_METHODS:
    index = run_index.open_index(args, opened, step)
    train = None  # the index holds the documents
  else:
    train, _ = run_index.training_set(cfg, attr)
  started = time.perf_counter()
  prepared = run.prepare(args.method, cfg, graphdef, params, train, attr, index_dir=index_dir,
                         decode=tokenizer.decode, build_index=False)
  prepare_s = time.perf_counter() - started
  started = time.perf_counter()
  scores = prepared.query(query)
  query_s = time.perf_counter() - started
  if train is None:
    found = service.top_results(index, scores, attr.top_examples, attr.span_tokens,
                                tokenizer.decode)
  else:
    found = results(scores, train, query, attr.top_examples, attr.span_tokens,
                    tokenizer.decode)
  target_text = index_lib.token_text(tokenizer.decode, query.prompt, query.target)
  print(f"{args.method}: top {len(found)} training documents for [[{target_text}]] after "
        f"{args.prompt!r} (prepare {prepare_s:.2f}s, query {query_s:.3f}s, "
        f"state {prepared.stored_bytes} bytes)")
  for r in found:
    print(f"{r['rank']:3d}. {r['score']:+.4g}  document {r['example_id']}: {r['text']}")
  if args.json:
    outputs.write_json(args.json, {
        "format": RESULT_FORMAT, "method": args.method, "prompt": args.prompt,
        "target_token": target_text, "target_id": query.target,
        "prepare_seconds": prepare_s, "query_seconds": query_s,
        "stored_bytes": prepared.stored_bytes, "results": found})


if __name__ == "__main__":
  main()
