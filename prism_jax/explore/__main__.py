"""Prototype explorer: `python -m prism_jax.explore --exp prism_tiny [--prompt TEXT]`.

Labels every prototype (top tokens through the unembedding; salient n-grams of its training
neighbourhood when an index exists; a rule-based category, prism_jax/explore/taxonomy.py;
optionally an LLM labeller), measures usage on the validation split (dead = never active),
maps the prototype keys to 2-D (UMAP if installed, else PCA) and writes
<workdir>/explore/{labels.json, map.json, report.html}.
"""

from __future__ import annotations

import collections
import os

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from prism_jax import cli, outputs
from prism_jax.errors import UserError, exit_on_user_error
from prism_jax.run import Run
from prism_jax import layout
from prism_jax.explore import labels as labels_lib
from prism_jax.explore import projection, report
from prism_jax.models import lm

DEFAULT_PROMPT = "It was a dark and stormy night"


def usage_stats(graphdef, params, batches, num_prototypes: int, progress: bool = True
                ) -> tuple[np.ndarray, np.ndarray, int]:
  """(share of scored positions where each prototype is active [M], its mean activation
  when active [M], positions) over `batches`."""

  @jax.jit
  def fn(params, batch):
    out = lm.forward(graphdef, params, batch)
    mask = batch["loss_mask"].astype(jnp.float32)[..., None]
    act = out.prototypes.activations
    return (jnp.sum((act > 0) * mask, axis=(0, 1)), jnp.sum(act * mask, axis=(0, 1)),
            jnp.sum(mask))

  counts, sums, tokens = np.zeros(num_prototypes), np.zeros(num_prototypes), 0.0
  keys = ("inputs", "targets", "positions", "segment_ids", "loss_mask")
  for batch in tqdm(batches, desc="usage", unit="batch", disable=not progress, leave=False):
    c, s, t = jax.device_get(fn(params, {k: batch[k] for k in keys}))
    counts, sums, tokens = counts + c, sums + s, tokens + float(t)
  if tokens == 0:
    raise UserError("the validation split produced no scored positions")
  return counts / tokens, sums / np.maximum(counts, 1), int(tokens)


def explore(cfg, workdir, graphdef, params, step, tokenizer, batches, *, index=None,
            prompt: str | None = DEFAULT_PROMPT, max_new_tokens: int = 24,
            projection_method: str = "auto", llm_labeller=None, out_dir: str | None = None,
            progress: bool = True) -> dict:
  """Everything the command does, returned as paths and figures."""
  m = cfg.prototypes.num_prototypes
  usage, mean_act, positions = usage_stats(graphdef, params, batches, m, progress)
  cards = labels_lib.label_prototypes(params, tokenizer, index, usage=usage,
                                      mean_activation=mean_act, llm_labeller=llm_labeller)
  keys = np.asarray(jax.device_get(params["prototype_head"]["keys"]), np.float64)
  coords, method = projection.project(keys, projection_method)
  generation = None
  if prompt:
    from prism_jax import generate

    gen = generate.Generator(graphdef, cfg, generate.Sampling(temperature=0.0))
    ids = generate.encode_prompt(tokenizer, prompt)
    result = gen(params, ids, max_new_tokens)
    generation = generate.to_json(result, tokenizer, prompt, {"step": step})
  dead = int(sum(c["dead"] for c in cards))
  categories = collections.Counter(c["category"] for c in cards)
  summary = {"experiment": cfg.name, "step": step, "prototypes": m,
             "top_k": cfg.prototypes.top_k, "validation positions": positions,
             "dead": f"{dead} ({dead / m:.1%})", "projection": method,
             "index": "yes" if index is not None else "no (n-grams/snippets need make index)"}
  out_dir = out_dir or layout.path(workdir, layout.EXPLORE)
  paths = {name: os.path.join(out_dir, name) for name in ("labels.json", "map.json",
                                                           "report.html")}
  outputs.write_json(paths["labels.json"], cards)
  outputs.write_json(paths["map.json"], {"method": method,
                                         "coords": np.asarray(coords).tolist(),
                                         "categories": [c["category"] for c in cards]})
  outputs.write_text(paths["report.html"], report.render(summary, cards, coords, generation))
  return {"paths": paths, "dead": dead, "categories": dict(categories), "projection": method,
          "generation": generation, "cards": cards}


@exit_on_user_error
def main(argv=None):
  parser = cli.base_parser(__doc__.splitlines()[0])
  parser.add_argument("--step", type=cli.number_flag("--step"),
                      default=None, help="checkpoint step (default latest)")
  parser.add_argument("--index", default=None, help="prototype index (default WORKDIR/index)")
  parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt for the contribution "
                      "view ('' to skip)")
  parser.add_argument("--max-new-tokens", type=cli.number_flag("--max-new-tokens"), default=24)
  parser.add_argument("--projection", choices=["auto", "umap", "pca"], default="auto")
  parser.add_argument("--llm-labeller", default=None,
                      help="package.module:function taking a card dict, returning a label")
  parser.add_argument("--val-batches", type=cli.number_flag("--val-batches"), default=None)
  parser.add_argument("--output", default=None, help="folder (default WORKDIR/explore)")
  parser.add_argument("--allow-index-mismatch", action="store_true",
                      help="use an index built from another checkpoint step (warns)")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  opened = Run.open(args.exp, args.workdir, args.overrides)
  cfg, workdir = opened.cfg, opened.workdir
  if cfg.model.head != "prism":
    raise UserError(f"{cfg.name} has a dense head: the explorer needs a PRISM model")
  labeller = labels_lib.load_llm_labeller(args.llm_labeller)
  if args.projection == "umap":
    import importlib.util
    if importlib.util.find_spec("umap") is None:
      raise UserError("--projection umap needs umap-learn (pip install umap-learn)")
  with opened, outputs.WorkdirLock(workdir, "explore"):
    _explore(args, opened, labeller)


def _explore(args, opened: Run, labeller):
  cfg, workdir = opened.cfg, opened.workdir
  graphdef, params, step = opened.params(args.step)
  from prism_jax import data as data_lib
  from prism_jax.attribution import index as index_lib
  from prism_jax.checkpoint import model_settings

  bundle = data_lib.prepare(cfg.data, cfg.model.vocab_size)
  index_dir = args.index or opened.index
  index = None
  if os.path.isfile(os.path.join(index_dir, "manifest.json")):
    index = index_lib.open_for(index_dir, step, model_settings(cfg), args.allow_index_mismatch)
  elif args.index:
    raise UserError(f"no prototype index at {args.index}")
  batches = data_lib.iterate_eval_batches(cfg.data, bundle.tokenizer, bundle.validation_source,
                                          num_batches=args.val_batches or cfg.train.eval_batches)
  out = explore(cfg, workdir, graphdef, params, step, bundle.tokenizer, batches, index=index,
                prompt=args.prompt or None, max_new_tokens=args.max_new_tokens,
                projection_method=args.projection, llm_labeller=labeller,
                out_dir=args.output, progress=not args.no_progress)
  print(f"{cfg.name} step {step}: {len(out['cards'])} prototypes, {out['dead']} dead; "
        f"categories {out['categories']}; map by {out['projection']}")
  if index is None:
    print(f"(no index at {index_dir}: labels use top tokens only; build one with make index)")
  for card in out["cards"][:5]:
    print(f"  p{card['id']:<4} [{card['category']}] {card['label']}")
  print(f"report: {out['paths']['report.html']}")


if __name__ == "__main__":
  main()
