"""Build the prototype index: `python -m prism_jax.main.index --exp prism_tiny [attr.key=value]`.

One streaming pass over every token of every training document (or a seeded sample of
documents, attr.index_examples=N), on the run's own mesh and sharding rules, each process
writing its own parts; an interrupted build resumes. Format and methods:
prism_jax/attribution/index.py and docs/attribution.md.
"""

from __future__ import annotations

import time

from etils import epath

from prism_jax import outputs, run_index
from prism_jax.attribution import index as index_lib, service
from prism_jax.errors import exit_on_user_error


@exit_on_user_error
def main(argv=None):
  args = run_index.parse(__doc__.splitlines()[0]).parse_args(argv)
  opened, attr = run_index.resolve(args)
  out = args.index or opened.index
  outputs.check_folder(out, "prototype index", index_lib.is_index, "--index")
  # The run's lock, and the index's own: two runs may name one --index.
  folder = epath.Path(str(out).rstrip("/"))
  with opened, outputs.WorkdirLock(opened.workdir, "index"), outputs.WorkdirLock(
      folder.parent, "index", file=f".{folder.name}.lock", what=f"--index {out}"):
    started = time.perf_counter()
    manifest = service.build_run_index(opened, attr, out, step=args.step)
    took = time.perf_counter() - started
  if manifest is None:  # another process of a multi-host build writes the manifest
    return
  if manifest.get("up_to_date"):
    print(f"the index at {out} is up to date (step {manifest['step']}, the same settings and "
          "documents): nothing to do; remove it, or give another --index, to build it again")
    return
  print(f"indexed {manifest['num_examples']} documents, {manifest['num_tokens']} positions, "
        f"{manifest['num_prototypes']} prototypes in {took:.1f}s -> {out}")
  per_token = manifest["bytes_per_token"]
  print(f"size: {manifest['bytes_total']} bytes in all, {per_token['all']:.1f} per indexed "
        "token; read per token by " + ", ".join(
            f"{m} {b:.1f}" for m, b in per_token.items() if m != "all"))


if __name__ == "__main__":
  main()
