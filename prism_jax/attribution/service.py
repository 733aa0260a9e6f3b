"""What the `index` and `attribute` entry points call: the run's index, and a query's results.

  with run:                                              # the run's mesh and rules
    manifest = service.build_run_index(run, attr, out)   # every token of the training split
    index = run_index.open_index(args, run, step)        # checked against the checkpoint
    found = service.explain(run.cfg, graphdef, params, index, query, attr, decode)
"""

from __future__ import annotations

import numpy as np

from prism_jax import tokenizer_record
from prism_jax.attribution import common, documents, indexing, prototype, single_pass
from prism_jax.attribution.config import AttributionConfig
from prism_jax.attribution.index import Index


def training_corpus(cfg, attr: AttributionConfig):
  """(the training split as documents, in record order; its tokenizer) via prism_jax.data."""
  from prism_jax import data as data_lib  # deferred: heavy import

  bundle = data_lib.prepare(cfg.data, cfg.model.vocab_size)
  corpus = documents.from_source(bundle.train_source, bundle.tokenizer, cfg.data.text_key,
                                 attr.index_examples, attr.index_seed)
  return corpus, bundle.tokenizer


def build_run_index(run, attr: AttributionConfig, out_dir: str, step: int | None = None,
                    stop_after_batches: int | None = None) -> dict | None:
  """Indexes every token of the run's training split on the run's mesh (call inside
  `with run:`); each process its share. Resumes an interrupted build of the same index."""
  graphdef, params, step = run.params(step)
  corpus, tokenizer = training_corpus(run.cfg, attr)
  tokenizer_record.check(run.workdir, tokenizer)
  return indexing.build(run.cfg, graphdef, params, corpus, out_dir, attr, mesh=run.mesh,
                        step=step, saved_ns=run.saved_ns(step), decode=tokenizer.decode,
                        stop_after_batches=stop_after_batches)


def explain(cfg, graphdef, params, index: Index, query: common.Query, attr: AttributionConfig,
            decode, matrices: single_pass.HeadMatrices | None = None
            ) -> tuple[prototype.Scores, list[dict]]:
  """`single_pass` for one query: (scores over documents, the top attr.top_examples as
  {rank, example, example_id, score, position, text})."""
  head = prototype.query_head(graphdef, params, query, cfg.data.seq_len)
  matrices = single_pass.HeadMatrices.of(params) if matrices is None else matrices
  scores = single_pass.score(index, head, matrices, single_pass.Settings.of(attr))
  return scores, top_results(index, scores, attr.top_examples, attr.span_tokens, decode)


def top_results(index: Index, scores: prototype.Scores, top: int, span: int, decode
                ) -> list[dict]:
  """The `top` best documents, each with its best position's text ([[token]] highlighted)."""
  out = []
  examples = scores.top(top)
  for rank, (e, value, token) in enumerate(zip(examples, scores.score_of(examples),
                                               scores.best_of(examples)), 1):
    token = int(token)
    position = int(index.gather("offset", np.array([token]))[0]) if token >= 0 else 0
    text = index.position_span(token, span, decode) if token >= 0 else ""
    out.append({"rank": rank, "example": int(e), "example_id": index.record_id(int(e)),
                "score": float(value), "position": position, "text": text})
  return out
