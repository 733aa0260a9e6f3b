"""Sampling with a KV cache (entry point: `python -m prism_jax.main.generate`).

Greedy decoding or temperature / top-k / top-p sampling with a KV cache (`--no-cache` runs
the full forward pass at every step instead, for comparison). For a PRISM model every
generated token comes with its prototype contributions c_j(y) = a_j <U_j, E_y> over the k
active prototypes, which add up exactly to the token's logit; `to_json` and
`format_contributions` present them.
"""

from __future__ import annotations

import collections
import dataclasses
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from prism_jax.config import ExperimentConfig
from prism_jax.downstream import special_id
from prism_jax.errors import UserError
from prism_jax.models import lm, prism_head

FORMAT = "prism-generation/1"  # the JSON `generate` writes (its --output replaces only one)


@dataclasses.dataclass(frozen=True)
class Sampling:
  temperature: float = 1.0  # 0: greedy (argmax)
  top_k: int = 0            # 0: no top-k filter
  top_p: float = 1.0        # 1: no nucleus filter

  def __post_init__(self):
    if self.temperature < 0:
      raise UserError(f"--temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise UserError(f"--top-k must be >= 0, got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")


def filter_logits(logits_BxV: jax.Array, sampling: Sampling) -> jax.Array:
  """Temperature-scaled logits with everything outside top-k / top-p set to -inf."""
  logits = logits_BxV.astype(jnp.float32) / sampling.temperature
  if sampling.top_k:
    kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][..., -1:]
    logits = jnp.where(logits >= kth, logits, -jnp.inf)
  if sampling.top_p < 1.0:
    sorted_desc = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the best token always stays).
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(mass_before < sampling.top_p, sorted_desc, jnp.inf), axis=-1,
                     keepdims=True)
    logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
  return logits


def sample_token(logits_BxV: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
  """Next token ids [B]: argmax at temperature 0, else a draw from the filtered softmax."""
  if sampling.temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, filter_logits(logits_BxV, sampling)).astype(jnp.int32)


def _last(x, position):
  """x[:, position] for a traced position, keeping the length axis: [B, 1, ...]."""
  return jax.lax.dynamic_slice_in_dim(x, position, 1, axis=1)


def _choose(params, out: lm.LMOutput, position, key, sampling: Sampling) -> dict:
  """Samples the token after `position` and explains its logit (PRISM: by prototype)."""
  logits_BxV = _last(out.logits, position)[:, 0]
  token_B = sample_token(logits_BxV, key, sampling)
  info = {
      "token": token_B,
      "logit": jnp.take_along_axis(logits_BxV, token_B[:, None], -1)[:, 0],
      "logprob": jnp.take_along_axis(jax.nn.log_softmax(logits_BxV), token_B[:, None], -1)[:, 0],
  }
  if out.prototypes is not None:
    values_Bx1xk = _last(out.prototypes.top_values, position)
    indices_Bx1xk = _last(out.prototypes.top_indices, position)
    contributions_Bx1xk = prism_head.prototype_contributions(
        values_Bx1xk, indices_Bx1xk, params["prototype_head"]["values"], lm.unembedding(params),
        token_B[:, None])
    info.update(prototype_ids=indices_Bx1xk[:, 0], activations=values_Bx1xk[:, 0],
                contributions=contributions_Bx1xk[:, 0])
  return info


@dataclasses.dataclass
class Generation:
  prompt_ids: list[int]
  token_ids: list[int]
  steps: list[dict]   # per generated token: logit, logprob, (PRISM) prototypes
  seconds: float      # wall time of the decoding loop (prefill included)


class Generator:
  """Compiled prefill / decode-step functions for one model; reusable across prompts."""

  def __init__(self, graphdef, cfg: ExperimentConfig, sampling: Sampling, *,
               controller=None, suppressed_M=None):
    # controller / suppressed_M: a linear prototype controller and a suppression mask
    # (prism_jax.control.interventions), applied inside the head at every step; None: the
    # model as trained.
    self.cfg, self.sampling = cfg, sampling
    slots = cfg.model.max_seq_len
    # Recompile guard: how often jax traced each step function (the bodies below run only
    # while tracing). The decode step is traced once per Generator whatever the position
    # or token (both are traced values); prefill once per prompt length. Tests pin this.
    self.traces = collections.Counter()

    def prefill(params, prompt_BxP, key):
      self.traces["prefill"] += 1
      batch, length = prompt_BxP.shape
      positions = jnp.broadcast_to(jnp.arange(length), prompt_BxP.shape)
      out, cache = lm.decode(graphdef, params, prompt_BxP, positions,
                             lm.init_cache(cfg, batch, slots), 0, suppressed_M,
                             controller=controller)
      return cache, _choose(params, out, length - 1, key, sampling)

    def decode_step(params, cache, token_B, index, key):
      self.traces["decode_step"] += 1
      positions = jnp.full((token_B.shape[0], 1), index)
      out, cache = lm.decode(graphdef, params, token_B[:, None], positions, cache, index,
                             suppressed_M, controller=controller)
      return cache, _choose(params, out, 0, key, sampling)

    def full_step(params, buffer_BxS, length, key):
      self.traces["full_step"] += 1
      # No cache: the whole (right-padded) sequence again; causal attention ignores padding.
      out = lm.forward(graphdef, params, {"inputs": buffer_BxS}, suppressed_M,
                       controller=controller)
      return _choose(params, out, length - 1, key, sampling)

    self._prefill = jax.jit(prefill)
    self._decode_step = jax.jit(decode_step, donate_argnums=(1,))
    self._full_step = jax.jit(full_step)

  def __call__(self, params, prompt_ids: Sequence[int], max_new_tokens: int, seed: int = 0,
               use_cache: bool = True, stop_ids: Sequence[int] = (),
               progress: bool = False) -> Generation:
    slots = self.cfg.model.max_seq_len
    if not prompt_ids:
      raise UserError("the prompt is empty")
    if len(prompt_ids) >= slots:
      raise UserError(f"the prompt is {len(prompt_ids)} tokens, longer than the model's context "
                      f"of {slots} (model.max_seq_len) minus one generated token")
    max_new_tokens = min(max_new_tokens, slots - len(prompt_ids))
    key = jax.random.key(seed)
    prompt = np.asarray([prompt_ids], np.int32)
    tokens, infos = [], []
    started = time.perf_counter()
    bar = tqdm(total=max_new_tokens, desc="generate", unit="tok", disable=not progress,
               leave=False, file=sys.stderr)
    if use_cache:
      cache, info = self._prefill(params, prompt, jax.random.fold_in(key, 0))
    else:
      buffer = np.zeros((1, slots), np.int32)
      buffer[0, :len(prompt_ids)] = prompt_ids
      info = self._full_step(params, buffer, len(prompt_ids), jax.random.fold_in(key, 0))
    for step in range(max_new_tokens):
      info = jax.device_get(info)
      token = int(info["token"][0])
      tokens.append(token)
      infos.append({k: np.asarray(v[0]) for k, v in info.items()})
      bar.update(1)
      if token in stop_ids or step == max_new_tokens - 1:
        break
      step_key = jax.random.fold_in(key, step + 1)
      position = len(prompt_ids) + step  # where the new token sits
      if use_cache:
        cache, info = self._decode_step(params, cache, np.asarray([token], np.int32), position,
                                        step_key)
      else:
        buffer[0, position] = token
        info = self._full_step(params, buffer, position + 1, step_key)
    bar.close()
    return Generation(prompt_ids=list(prompt_ids), token_ids=tokens,
                      steps=[_step_record(i) for i in infos],
                      seconds=time.perf_counter() - started)


def _step_record(info: dict) -> dict:
  record = {"id": int(info["token"]), "logit": float(info["logit"]),
            "logprob": float(info["logprob"])}
  if "contributions" in info:
    order = np.argsort(-info["contributions"])
    record["prototypes"] = [{"id": int(info["prototype_ids"][j]),
                             "activation": float(info["activations"][j]),
                             "contribution": float(info["contributions"][j])} for j in order]
    record["contribution_sum"] = float(np.sum(info["contributions"], dtype=np.float64))
  return record


# ------------------------------------------------------------------------------------------
# Presentation


def token_texts(tokenizer, prompt_ids: Sequence[int], token_ids: Sequence[int]) -> list[str]:
  """Surface text of each generated token (with its leading space), by incremental decode."""
  texts, previous = [], tokenizer.decode(list(prompt_ids))
  for i in range(len(token_ids)):
    current = tokenizer.decode(list(prompt_ids) + list(token_ids[:i + 1]))
    texts.append(current[len(previous):] if current.startswith(previous) else
                 tokenizer.decode([token_ids[i]]))
    previous = current
  return texts


def to_json(generation: Generation, tokenizer, prompt: str, meta: dict) -> dict:
  texts = token_texts(tokenizer, generation.prompt_ids, generation.token_ids)
  steps = [dict(step, text=text) for step, text in zip(generation.steps, texts)]
  return {"format": FORMAT, **meta, "prompt": prompt,
          "prompt_tokens": len(generation.prompt_ids),
          "completion": "".join(texts), "tokens": steps,
          "tokens_per_second": len(steps) / max(generation.seconds, 1e-9)}


def format_contributions(result: dict, shown: int) -> str:
  """One line per token: its logit as the sum of its prototypes' contributions."""
  lines = []
  for step in result["tokens"]:
    head = f"{step['text']!r:>14} logit {step['logit']:+8.3f}"
    if "prototypes" not in step:
      lines.append(f"{head}  p={np.exp(step['logprob']):.3f}")
      continue
    parts = [f"p{p['id']} {p['contribution']:+.3f}" for p in step["prototypes"][:shown]]
    rest = step["prototypes"][shown:]
    if rest:
      parts.append(f"{len(rest)} more {sum(p['contribution'] for p in rest):+.3f}")
    lines.append(f"{head} = " + ", ".join(parts))
  return "\n".join(lines)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
  ids = list(tokenizer.encode(prompt))
  bos = special_id(tokenizer, "bos_id")
  return ([bos] if bos is not None else []) + ids
