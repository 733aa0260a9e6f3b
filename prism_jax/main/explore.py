"""Prototype explorer: `python -m prism_jax.main.explore --exp prism_tiny [--prompt TEXT]`.

Labels every prototype (top tokens through the unembedding; salient n-grams of its training
neighbourhood when an index exists; a rule-based category, prism_jax/explore/taxonomy.py;
optionally an LLM labeller), measures usage on the validation split (dead = never active),
maps the prototype keys to 2-D (UMAP if installed, else PCA) and writes
<workdir>/explore/{labels.json, map.json, report.html}.
"""

from __future__ import annotations

from prism_jax import cli, evaluation, outputs, run_index
from prism_jax.errors import UserError, exit_on_user_error
from prism_jax.explore import labels as labels_lib
from prism_jax.explore.explorer import DEFAULT_PROMPT, check_output, explore
from prism_jax.run import Run


@exit_on_user_error
def main(argv=None):
  parser = cli.base_parser(__doc__.splitlines()[0])
  parser.add_argument("--step", type=cli.number_flag("--step"),
                      default=None, help="checkpoint step (default latest)")
  parser.add_argument("--index", default=None, help="prototype index (default WORKDIR/index)")
  parser.add_argument("--prompt", default=DEFAULT_PROMPT, type=cli.utf8_text,
                      help="prompt for the contribution view ('' to skip)")
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
  if args.output:  # (WORKDIR/explore is the explorer's own folder)
    check_output(args.output)
  with opened, outputs.WorkdirLock(workdir, "explore"):
    _explore(args, opened, labeller)


def _explore(args, opened: Run, labeller):
  cfg, workdir = opened.cfg, opened.workdir
  graphdef, params, step = opened.params(args.step)
  bundle = opened.data()
  index_dir = args.index or opened.index
  index = run_index.open_if_built(index_dir, opened, step, args.allow_index_mismatch)
  if index is None and args.index:
    raise UserError(f"no prototype index at {args.index}")
  batches = evaluation.validation_batches(cfg, bundle, args.val_batches or cfg.train.eval_batches)
  out = explore(cfg, workdir, graphdef, params, step, bundle.tokenizer, batches, index=index,
                prompt=args.prompt or None, max_new_tokens=args.max_new_tokens,
                projection_method=args.projection, llm_labeller=labeller,
                out_dir=args.output, progress=not args.no_progress,
                saved_ns=opened.saved_ns(step))
  print(f"{cfg.name} step {step}: {len(out['cards'])} prototypes, {out['dead']} dead; "
        f"categories {out['categories']}; map by {out['projection']}")
  if index is None:
    print(f"(no index at {index_dir}: labels use top tokens only; build one with make index)")
  for card in out["cards"][:5]:
    print(f"  p{card['id']:<4} [{card['category']}] {card['label']}")
  print(f"report: {out['paths']['report.html']}")


if __name__ == "__main__":
  main()
