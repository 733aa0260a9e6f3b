"""Targeted prototype suppression: choose prototypes, mask them before the top-k, measure.

Choosing: by id, by label (the explorer's labels, or top tokens through the unembedding when
none are saved), or by the text their training neighbourhood matches (the index's spans).
Suppressing changes no weight: the masked prototypes' scores become -inf before the top-k,
so the next-best prototypes fill in (`prism_head.prototype_logits(suppressed_M=...)`).
Measuring: a word family's next-token probability mass and top-1 rate, the log-probability
of the family where it is the real next token, and the validation loss.
"""

from __future__ import annotations

import string
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from prism_jax.control import records
from prism_jax import layout
from prism_jax.errors import UserError
from prism_jax.models import lm

FORMAT = "prism-suppression/1"


def mask_from_ids(ids: Iterable[int], num_prototypes: int) -> np.ndarray:
  """bool [M] with the given prototypes set; out-of-range ids are a UserError."""
  mask = np.zeros(num_prototypes, bool)
  for j in ids:
    if not 0 <= int(j) < num_prototypes:
      raise UserError(f"prototype {j} does not exist (the model has {num_prototypes})")
    mask[int(j)] = True
  return mask


def by_label(cards: dict[int, dict], text: str, top_tokens: int = 3) -> list[int]:
  """Prototypes labelled `text` (case-insensitive), best first: one of their first
  `top_tokens` tokens through the unembedding is `text` (ranked by that token's place, then
  its score <U_j, E_y>), or else an LLM label contains it (after every token match, by id).
  (The n-gram part of the automatic label is neighbourhood text: choose by it with --match.)"""
  needle = text.strip().lower()
  ranked = []
  for j, card in cards.items():
    tokens = card.get("top_tokens", [])[:top_tokens]
    places = [r for r, t in enumerate(tokens) if t["text"].strip().lower() == needle]
    if places:
      ranked.append(((0, places[0], -float(tokens[places[0]].get("score", 0.0))), j))
    elif needle in card.get("llm_label", "").lower():
      ranked.append(((1, 0, 0.0), j))
  return [j for _, j in sorted(ranked)]


def by_neighbourhood(index, text: str, min_share: float, top: int) -> list[tuple[int, float]]:
  """(prototype, share) for prototypes whose top `top` neighbourhood spans contain `text`
  (case-insensitive) in at least `min_share` of them, highest share first."""
  needle = text.lower()
  hits = []
  for j in range(index.manifest["num_prototypes"]):
    tokens, _ = index.neighbours(j)
    n = min(top, len(tokens))
    if n == 0:
      continue
    share = sum(needle in index.span(j, r).lower() for r in range(n)) / n
    if share >= min_share:
      hits.append((j, share))
  return sorted(hits, key=lambda t: -t[1])


def normalise(piece: str) -> str:
  return piece.replace("\u2581", " ").strip().strip(string.punctuation).lower()


def word_family(tokenizer, vocab_size: int, words: Sequence[str]) -> np.ndarray:
  """bool [V]: tokens whose text (lower-cased, spaces/punctuation stripped) is one of `words`."""
  wanted = {w.strip().lower() for w in words if w.strip()}
  family = np.zeros(vocab_size, bool)
  for i in range(vocab_size):
    family[i] = normalise(tokenizer.decode([i])) in wanted
  if not family.any():
    raise UserError(f"no token of the vocabulary spells any of {sorted(wanted)}; choose "
                    "other --words")
  return family


def make_measure_fn(graphdef):
  """jit((params, suppressed_M or None, family_V, batch)) -> sums over the batch's scored
  positions: loss, tokens, family probability mass, family top-1, family-target log-prob."""

  def measure(params, suppressed_M, family_V, batch):
    out = lm.forward(graphdef, params, batch, suppressed_M)
    mask = batch["loss_mask"].astype(jnp.float32)
    logp = jax.nn.log_softmax(out.logits, axis=-1)
    per_token = optax.softmax_cross_entropy_with_integer_labels(out.logits, batch["targets"])
    family_mass = jnp.sum(jnp.exp(logp) * family_V, axis=-1)
    top1 = family_V[jnp.argmax(out.logits, axis=-1)].astype(jnp.float32)
    is_family_target = family_V[batch["targets"]].astype(jnp.float32) * mask
    return {"loss_sum": jnp.sum(per_token * mask), "tokens": jnp.sum(mask),
            "family_mass_sum": jnp.sum(family_mass * mask), "family_top1": jnp.sum(top1 * mask),
            "family_targets": jnp.sum(is_family_target),
            "family_target_logp": jnp.sum(-per_token * is_family_target)}

  return jax.jit(measure)


def measure(measure_fn, params, suppressed_M, family_V, batches: Iterable[dict],
            progress: bool = True, desc: str = "measure") -> dict:
  """Behaviour rates and validation loss over `batches` (token-weighted)."""
  sums: dict = {}
  for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
    keys = ("inputs", "targets", "positions", "segment_ids", "loss_mask")
    got = jax.device_get(measure_fn(params, suppressed_M, family_V,
                                    {k: batch[k] for k in keys}))
    for k, v in got.items():
      sums[k] = sums.get(k, 0.0) + float(v)
  tokens = max(sums.get("tokens", 0.0), 1.0)
  family_targets = sums.get("family_targets", 0.0)
  return {"loss": sums["loss_sum"] / tokens, "tokens": int(sums["tokens"]),
          "family_probability_mass": sums["family_mass_sum"] / tokens,
          "family_top1_rate": sums["family_top1"] / tokens,
          "family_target_positions": int(family_targets),
          "family_target_logprob": (sums["family_target_logp"] / family_targets
                                    if family_targets else float("nan"))}


def mention_rate(generator, params, tokenizer, prompts: Sequence[str], family_V: np.ndarray,
                 samples: int, max_new_tokens: int) -> dict:
  """Share of sampled continuations (seeds 0..samples-1 per prompt) that contain a token of
  the family, and the family's share of all generated tokens."""
  from prism_jax.sampling import encode_prompt

  mentions, family_tokens, tokens = 0, 0, 0
  for prompt in prompts:
    ids = encode_prompt(tokenizer, prompt)
    for seed in range(samples):
      out = generator(params, ids, max_new_tokens, seed=seed)
      hits = int(np.sum(family_V[np.asarray(out.token_ids)]))
      mentions += hits > 0
      family_tokens += hits
      tokens += len(out.token_ids)
  n = len(prompts) * samples
  return {"generations": n, "mention_rate": mentions / max(n, 1),
          "family_token_share": family_tokens / max(tokens, 1)}


def default_path(workdir: str, name: str) -> str:
  return layout.path(workdir, layout.SUPPRESSIONS, f"{name}.json")


def save(path: str, prototypes: Sequence[int], meta: dict) -> str:
  return records.save(path, {"format": FORMAT,
                             "prototypes": sorted(int(j) for j in prototypes), **meta})


def _prototype_ids(record: dict) -> list[int]:
  ids = record["prototypes"]
  if not isinstance(ids, list) or not all(type(j) is int for j in ids):  # noqa: E721 (no bool)
    raise ValueError("'prototypes' must be a list of integer prototype ids")
  return ids


def load(path: str, num_prototypes: int, top_k: int | None = None) -> np.ndarray:
  """The saved set as bool [M]; UserError when missing, malformed, or when it would leave
  fewer than `top_k` prototypes to choose from."""
  ids = records.load(path, FORMAT, "suppression set",
                     "make one with python -m prism_jax.main.control suppress ...", _prototype_ids)
  mask = mask_from_ids(ids, num_prototypes)
  if top_k is not None:
    check_leaves_enough(mask, top_k, path)
  return mask


def check_leaves_enough(mask: np.ndarray, top_k: int, what: str) -> None:
  """Suppressing must leave at least top-k prototypes: else positions mix nothing."""
  left = int(mask.size - mask.sum())
  if left < top_k:
    raise UserError(f"{what} suppresses {int(mask.sum())} of {mask.size} prototypes, leaving "
                    f"{left}, fewer than prototypes.top_k={top_k}")
