"""The explorer's work (entry point: `python -m prism_jax.main.explore`): usage of each
prototype on validation batches, labels, a 2-D map, and the report files.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from tqdm import tqdm

from prism_jax import layout, outputs, sampling
from prism_jax.errors import UserError
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


REPORT_FILES = ("labels.json", "map.json", "report.html")


def check_output(out_dir: str) -> None:
  """Refuses, before any work, a folder holding files of the report's names that are not an
  earlier report's (its labels.json says so): they would be replaced."""
  outputs.check_folder_target(out_dir, "--output")
  taken = [name for name in REPORT_FILES if epath.Path(out_dir, name).exists()]
  if taken and not labels_lib.is_labels_file(epath.Path(out_dir, "labels.json")):
    raise UserError(f"--output {out_dir} holds {', '.join(taken)}, not written by the "
                    "explorer (nothing was written): give another folder")


def explore(cfg, workdir, graphdef, params, step, tokenizer, batches, *, index=None,
            prompt: str | None = DEFAULT_PROMPT, max_new_tokens: int = 24,
            projection_method: str = "auto", llm_labeller=None, out_dir: str | None = None,
            progress: bool = True, saved_ns: int | None = None) -> dict:
  """Everything the command does, returned as paths and figures. `saved_ns`: when Orbax
  committed checkpoint `step`, recorded with the labels (control reads them back)."""
  m = cfg.prototypes.num_prototypes
  usage, mean_act, positions = usage_stats(graphdef, params, batches, m, progress)
  cards = labels_lib.label_prototypes(params, tokenizer, index, usage=usage,
                                      mean_activation=mean_act, llm_labeller=llm_labeller,
                                      progress=progress)
  keys = np.asarray(jax.device_get(params["prototype_head"]["keys"]), np.float64)
  coords, method = projection.project(keys, projection_method)
  generation = None
  if prompt:
    gen = sampling.Generator(graphdef, cfg, sampling.Sampling(temperature=0.0))
    ids = sampling.encode_prompt(tokenizer, prompt)
    result = gen(params, ids, max_new_tokens)
    generation = sampling.to_json(result, tokenizer, prompt, {"step": step})
  dead = int(sum(c["dead"] for c in cards))
  categories = collections.Counter(c["category"] for c in cards)
  summary = {"experiment": cfg.name, "step": step, "prototypes": m,
             "top_k": cfg.prototypes.top_k, "validation positions": positions,
             "dead": f"{dead} ({dead / m:.1%})", "projection": method,
             "index": "yes" if index is not None else "no (n-grams/snippets need make index)"}
  out_dir = out_dir or layout.path(workdir, layout.EXPLORE)
  paths = {name: layout.path(out_dir, name) for name in REPORT_FILES}
  outputs.write_json(paths["labels.json"], labels_lib.labels_record(cards, step, saved_ns))
  outputs.write_json(paths["map.json"], {"method": method,
                                         "coords": np.asarray(coords).tolist(),
                                         "categories": [c["category"] for c in cards]})
  outputs.write_text(paths["report.html"], report.render(summary, cards, coords, generation))
  return {"paths": paths, "dead": dead, "categories": dict(categories), "projection": method,
          "generation": generation, "cards": cards}
