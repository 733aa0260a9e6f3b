"""Generate text from a checkpoint: `python -m prism_jax.main.generate --exp E --prompt ...`.

Greedy decoding or temperature / top-k / top-p sampling with a KV cache (prism_jax/sampling.py);
for a PRISM model each token's logit as the sum of its prototypes' contributions, printed and
written as JSON under <workdir>/generations/.
"""

from __future__ import annotations

import dataclasses
import time

from prism_jax import cli, layout, outputs
from prism_jax.control import interventions
from prism_jax.downstream import special_id
from prism_jax.errors import UserError, exit_on_user_error
from prism_jax.run import Run
from prism_jax.sampling import (FORMAT as GENERATION_FORMAT, Generator, Sampling, encode_prompt,
                                format_contributions, to_json)


def parse_args(argv=None):
  parser = cli.base_parser(__doc__.splitlines()[0])
  parser.add_argument("--prompt", required=True, type=cli.utf8_text, help="text to continue")
  parser.add_argument("--max-new-tokens", type=cli.number_flag("--max-new-tokens"), default=48)
  parser.add_argument("--temperature", type=cli.number_flag("--temperature"),
                      default=0.8, help="0 = greedy")
  parser.add_argument("--top-k", type=cli.number_flag("--top-k"),
                      default=0, help="keep the k most likely (0: all)")
  parser.add_argument("--top-p", type=cli.number_flag("--top-p"),
                      default=1.0, help="nucleus mass (1: all)")
  parser.add_argument("--greedy", action="store_true", help="argmax decoding (temperature 0)")
  parser.add_argument("--seed", type=cli.number_flag("--seed"), default=0)
  parser.add_argument("--step", type=cli.number_flag("--step"),
                      default=None, help="checkpoint step (default latest)")
  parser.add_argument("--no-cache", action="store_true", help="recompute the full sequence "
                      "every step instead of using the KV cache")
  parser.add_argument("--show", type=cli.number_flag("--show"),
                      default=4, help="prototypes shown per token")
  interventions.add_arguments(parser)
  parser.add_argument("--output", default=None, help="JSON path (default "
                      "<workdir>/generations/<time>.json)")
  return parser.parse_args(argv)


@exit_on_user_error
def main(argv=None):
  args = parse_args(argv)
  with Run.open(args.exp, args.workdir, args.overrides) as opened:
    _generate(args, opened)


def _generate(args, opened: Run):
  cfg, workdir = opened.cfg, opened.workdir
  if args.max_new_tokens < 1:
    raise UserError("--max-new-tokens must be at least 1")
  outputs.check_file_target(args.output, "--output", GENERATION_FORMAT)
  sampling = Sampling(temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k,
                      top_p=args.top_p)
  chosen = interventions.load(args, cfg)  # a bad file fails before the restore
  graphdef, params, step = opened.params(args.step)
  interventions.warn_if_made_elsewhere(args, opened, step)
  tokenizer = opened.tokenizer()
  prompt_ids = encode_prompt(tokenizer, args.prompt)
  eos = special_id(tokenizer, "eos_id")
  generation = Generator(graphdef, cfg, sampling, **chosen)(
      params, prompt_ids, args.max_new_tokens, seed=args.seed, use_cache=not args.no_cache,
      stop_ids=() if eos is None else (eos,), progress=True)
  result = to_json(generation, tokenizer, args.prompt,
                   {"experiment": cfg.name, "step": step, "head": cfg.model.head,
                    "sampling": dataclasses.asdict(sampling), "seed": args.seed,
                    "kv_cache": not args.no_cache, "controller": args.controller,
                    "suppress": args.suppress})
  output = args.output or outputs.unused_path(layout.path(workdir, layout.GENERATIONS),
                                              time.strftime("%Y%m%d-%H%M%S"), ".json")
  outputs.write_json(output, result)
  print(args.prompt + result["completion"])
  print()
  print(format_contributions(result, args.show))
  print(f"\n{len(result['tokens'])} tokens at {result['tokens_per_second']:.1f} tok/s "
        f"(compilation included; step {step}); JSON: {output}")


if __name__ == "__main__":
  main()
