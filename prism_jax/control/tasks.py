"""Downstream tasks for the controller: calibration/held-out splits, frozen-model features,
and accuracy through the full model with a controller applied inside the head."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from prism_jax import downstream
from prism_jax.control.controller import ChoiceFeatures
from prism_jax.errors import UserError
from prism_jax.models import lm
from prism_jax.models.prism_head import Controller


def split(examples: Sequence, calibration_fraction: float, seed: int) -> tuple[list, list]:
  """(calibration, held-out): a seeded permutation of the documents, never of choices."""
  order = np.random.default_rng(seed).permutation(len(examples))
  cut = _calibration_count(len(examples), calibration_fraction)
  return [examples[i] for i in order[:cut]], [examples[i] for i in order[cut:]]


def _calibration_count(count: int, calibration_fraction: float) -> int:
  return int(round(calibration_fraction * count))


def check_split(name: str, count: int, calibration_fraction: float) -> None:
  """Both parts of `split` need two documents (a fit, and a held-out mean with its error)."""
  cut = _calibration_count(count, calibration_fraction)
  if min(cut, count - cut) < 2:
    raise UserError(f"{name}: {count} documents at --calibration-fraction "
                    f"{calibration_fraction:g} give {cut} to calibrate on and {count - cut} to "
                    "hold out; each needs at least 2 (more documents, or another fraction)")


def request_rows(examples, tokenizer, max_len: int):
  """Scoring rows of every choice and their (example, choice) owners."""
  rows, owners = [], []
  for e, example in enumerate(examples):
    for c, (context, continuation) in enumerate(zip(example.contexts, example.continuations)):
      rows.append(downstream.scoring_row(*downstream.encode_request(tokenizer, context,
                                                                    continuation), max_len))
      owners.append((e, c))
  return rows, owners


def _bucket(length: int, max_len: int) -> int:
  return min(max_len, max(16, 1 << (length - 1).bit_length()))


def _batches(rows, batch_size: int, max_len: int, desc: str, progress: bool):
  """Fixed-shape, length-sorted batches: (row ids, inputs, targets, mask)."""
  order = sorted(range(len(rows)), key=lambda i: len(rows[i].inputs))
  for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch",
                    disable=not progress, leave=False):
    chunk = order[start:start + batch_size]
    length = _bucket(max(len(rows[i].inputs) for i in chunk), max_len)
    arrays = [np.zeros((batch_size, length), dt) for dt in (np.int32, np.int32, np.float32)]
    for j, i in enumerate(chunk):
      n = len(rows[i].inputs)
      arrays[0][j, :n], arrays[1][j, :n], arrays[2][j, :n] = (rows[i].inputs, rows[i].targets,
                                                              rows[i].mask)
    yield chunk, *arrays


def features(graphdef, params, examples, tokenizer, max_len: int, batch_size: int = 32,
             progress: bool = True) -> ChoiceFeatures:
  """One frozen forward pass per request; keeps the scored positions' top-k."""
  rows, owners = request_rows(examples, tokenizer, max_len)
  fn = jax.jit(lambda p, x: (lambda o: (o.prototypes.top_values, o.prototypes.top_indices))(
      lm.forward(graphdef, p, {"inputs": x})))
  per_row: list = [None] * len(rows)
  for chunk, inputs, targets, mask in _batches(rows, batch_size, max_len, "features", progress):
    values, indices = jax.device_get(fn(params, inputs))
    for j, i in enumerate(chunk):
      keep = mask[j] > 0
      per_row[i] = (values[j][keep], indices[j][keep], targets[j][keep])
  num_choices = max(len(ex.continuations) for ex in examples)
  choice_mask = np.zeros((len(examples), num_choices), bool)
  for e, c in owners:
    choice_mask[e, c] = True
  counts = [len(r[2]) for r in per_row]
  return ChoiceFeatures(
      top_values=np.concatenate([r[0] for r in per_row]).astype(np.float32),
      top_indices=np.concatenate([r[1] for r in per_row]).astype(np.int32),
      targets=np.concatenate([r[2] for r in per_row]).astype(np.int32),
      example=np.repeat([o[0] for o in owners], counts).astype(np.int32),
      choice=np.repeat([o[1] for o in owners], counts).astype(np.int32),
      choice_mask=choice_mask, labels=np.asarray([ex.label for ex in examples], np.int32))


def make_score_fn(graphdef):
  """jit((params, controller, inputs, targets, mask)) -> summed log P(continuation) [B]."""

  def score(params, controller, inputs_BxL, targets_BxL, mask_BxL):
    out = lm.forward(graphdef, params, {"inputs": inputs_BxL}, controller=controller)
    logp = jax.nn.log_softmax(out.logits, axis=-1)
    target_logp = jnp.take_along_axis(logp, targets_BxL[..., None], axis=-1)[..., 0]
    return jnp.sum(target_logp * mask_BxL, axis=1)

  return jax.jit(score)


def accuracy(score_fn, params, controller: Controller | None, examples, tokenizer,
             max_len: int, batch_size: int = 32, desc: str = "score",
             progress: bool = True) -> tuple[dict, np.ndarray]:
  """(downstream metrics with standard errors, per-example correctness [E]) through the full
  model, the controller applied inside the head (None: the model as trained)."""
  rows, owners = request_rows(examples, tokenizer, max_len)
  logprob = np.zeros(len(rows), np.float64)
  for chunk, inputs, targets, mask in _batches(rows, batch_size, max_len, desc, progress):
    lp = jax.device_get(score_fn(params, controller, inputs, targets, mask))
    logprob[chunk] = lp[:len(chunk)]
  per_example = [[0.0] * len(ex.continuations) for ex in examples]
  for (e, c), lp in zip(owners, logprob):
    per_example[e][c] = float(lp)
  labels = [ex.label for ex in examples]
  lengths = [[len(c) for c in ex.continuations] for ex in examples]
  metrics = downstream.choice_accuracy(per_example, lengths, labels)
  correct = np.asarray([int(np.argmax(lp)) == y for lp, y in zip(per_example, labels)], float)
  return metrics, correct
