"""EK-FAC influence over every trained matrix (the kronfluence recipe).

Sites (`capture.py`): the attention and MLP projections (per layer, `model.scan_layers` too),
the embedding lookup and the unembedding (two sites of one tied matrix), the prototype
values U and the (unit-normalised) prototype keys. Per site l with per-token input x_t and output gradient delta_t (`capture.py`):
  A_l = E[x x^T], S_l = E[delta delta^T]      Kronecker factors (labels sampled from the
                                              model: the true Fisher), summed over tokens
  A = Q_A diag . Q_A^T, S = Q_S diag . Q_S^T  eigendecompositions in float64
  Lambda_l[a, b] = mean_e ((Q_A^T G_e Q_S)[a, b])^2   eigenvalue correction with the
                                              per-example gradients G_e = sum_t x_t delta_t^T
  H_l^{-1} v = Q_A ((Q_A^T V Q_S) / (Lambda_l + lambda_l)) Q_S^T,  lambda_l = damping *
                                              mean(Lambda_l)
  score(q, e) = sum_l <H_l^{-1} G_q,l, G_e,l>

Scoring recomputes the training examples' layer inputs and output gradients per query (as
kronfluence does); the stored state is the eigenvectors and corrected eigenvalues.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from prism_jax.attribution import capture, common

# Every trained matrix: attention and MLP projections, the (tied) embedding and the
# unembedding, the prototype keys and values. Norm scales and the temperature are vectors.
LM_TARGETS = ("attn/wq", "attn/wk", "attn/wv", "attn/wo", "mlp/w_gate", "mlp/w_up", "mlp/w_down",
              "backbone/embedding", "unembedding", "prototype_head/keys", "prototype_head/values")


def lm_target(name: str) -> bool:
  return any(name.endswith(t) for t in LM_TARGETS)


@dataclasses.dataclass
class Layer:
  qa: np.ndarray      # [in, in] float32 eigenvectors of A
  qs: np.ndarray      # [out, out] float32 eigenvectors of S
  lam: np.ndarray     # [in, out] float32 corrected eigenvalues
  damping: float      # absolute damping for this layer


@dataclasses.dataclass
class Factors:
  layers: dict[str, Layer]

  @property
  def nbytes(self) -> int:
    return sum(l.qa.nbytes + l.qs.nbytes + l.lam.nbytes for l in self.layers.values())


def _per_example(x_Txi, d_Txo, batch_size: int, mask_BxL):
  """[B, T/B, in], [B, T/B, out], masked. A site may see r rows per position (the k
  selected prototype values of a position): its rows are ordered (batch, position, r)."""
  per_row = x_Txi.shape[0] // (batch_size * mask_BxL.shape[1])
  mask = jnp.repeat(mask_BxL, per_row, axis=1)[..., None]
  x = x_Txi.reshape(batch_size, -1, x_Txi.shape[-1]) * mask
  d = d_Txo.reshape(batch_size, -1, d_Txo.shape[-1]) * mask
  return x, d


def _mask(batch, batch_size):
  return batch["loss_mask"].reshape(batch_size, -1).astype(jnp.float32)


@functools.lru_cache(maxsize=16)
def _fns(loss_fn: Callable, is_target: Callable):
  io = capture.layer_io(loss_fn, is_target)

  @jax.jit
  def covariances(params, batch):
    b = batch["loss_mask"].shape[0]
    _, sites = io(params, batch)
    out = {}
    for name, (x, d) in sites.items():
      x, d = _per_example(x, d, b, _mask(batch, b))
      x, d = x.reshape(-1, x.shape[-1]), d.reshape(-1, d.shape[-1])
      out[name] = (x.T @ x, d.T @ d)
    return out, jnp.sum(batch["loss_mask"])

  @jax.jit
  def correction(params, batch, rotations):
    b = batch["loss_mask"].shape[0]
    _, sites = io(params, batch)
    out = {}
    for name, (x, d) in sites.items():
      qa, qs = rotations[name]
      x, d = _per_example(x, d, b, _mask(batch, b))
      rotated = jnp.einsum("bti,ia,bto,os->bas", x, qa, d, qs)  # Q_A^T G_e Q_S
      out[name] = jnp.sum(rotated**2, axis=0)
    return out

  @jax.jit
  def gradients(params, batch):
    b = batch["loss_mask"].shape[0]
    _, sites = io(params, batch)
    return {name: jnp.einsum("bti,bto->io", *_per_example(x, d, b, _mask(batch, b)))
            for name, (x, d) in sites.items()}

  @jax.jit
  def scores(params, batch, preconditioned):
    b = batch["loss_mask"].shape[0]
    _, sites = io(params, batch)
    total = jnp.zeros((b,), jnp.float32)
    for name, (x, d) in sites.items():
      x, d = _per_example(x, d, b, _mask(batch, b))
      total = total + jnp.einsum("bti,io,bto->b", x, preconditioned[name], d)
    return total

  return covariances, correction, gradients, scores


def fit(loss_fn: Callable, is_target: Callable, params, batches: Callable[[], Iterable[tuple]],
        damping: float) -> Factors:
  """Factors from `batches()`: (batch with labels to fit on, number of real rows) pairs."""
  covariances, correction, _, _ = _fns(loss_fn, is_target)
  sums, count = {}, 0.0
  for batch, _ in batches():
    cov, n = jax.device_get(covariances(params, batch))
    count += float(n)
    for name, (a, s) in cov.items():
      prev = sums.get(name, (0.0, 0.0))
      sums[name] = (prev[0] + np.asarray(a, np.float64), prev[1] + np.asarray(s, np.float64))
  rotations = {}
  for name, (a, s) in sums.items():
    _, qa = np.linalg.eigh(a / max(count, 1.0))
    _, qs = np.linalg.eigh(s / max(count, 1.0))
    rotations[name] = (qa, qs)
  rot32 = {n: (qa.astype(np.float32), qs.astype(np.float32)) for n, (qa, qs) in rotations.items()}
  lam, examples = {}, 0
  for batch, rows in batches():
    corr = jax.device_get(correction(params, batch, rot32))
    examples += rows
    for name, c in corr.items():
      lam[name] = lam.get(name, 0.0) + np.asarray(c, np.float64)
  layers = {}
  for name, (qa, qs) in rotations.items():
    lam_ab = lam[name] / max(examples, 1)
    # A site no gradient reaches (the PRISM head's dense key scores only choose the top-k;
    # the selected keys are their own site) has Lambda = 0: damping 1 makes it score 0.
    mean = float(np.mean(lam_ab))
    layers[name] = Layer(qa.astype(np.float32), qs.astype(np.float32), lam_ab.astype(np.float32),
                         damping * mean if mean > 0 else 1.0)
  return Factors(layers)


def precondition(layer: Layer, grad_ixo: np.ndarray) -> np.ndarray:
  """Q_A ((Q_A^T G Q_S) / (Lambda + lambda)) Q_S^T in float64."""
  qa, qs = layer.qa.astype(np.float64), layer.qs.astype(np.float64)
  rotated = qa.T @ np.asarray(grad_ixo, np.float64) @ qs
  return qa @ (rotated / (layer.lam.astype(np.float64) + layer.damping)) @ qs.T


def query_preconditioned(loss_fn, is_target, factors: Factors, params, query_batch) -> dict:
  _, _, gradients, _ = _fns(loss_fn, is_target)
  grads = jax.device_get(gradients(params, query_batch))
  return {name: precondition(factors.layers[name], g).astype(np.float32)
          for name, g in grads.items()}


def score_batches(loss_fn, is_target, params, preconditioned, batches: Iterable[tuple]
                  ) -> np.ndarray:
  _, _, _, scores = _fns(loss_fn, is_target)
  out = [np.asarray(scores(params, batch, preconditioned))[:rows] for batch, rows in batches]
  return np.concatenate(out).astype(np.float64)


# ------------------------------------------------------------------------------------------
# On a language model


@functools.lru_cache(maxsize=8)
def lm_loss(graphdef):
  return lambda params, batch: common.summed_loss(graphdef, params, batch)


@functools.lru_cache(maxsize=8)
def _sampler(graphdef):
  @jax.jit
  def sample(params, batch, key):
    logits = common.lm.forward(graphdef, params, batch).logits
    return jax.random.categorical(key, logits).astype(jnp.int32)
  return sample


def lm_batches(graphdef, params, train: common.TrainingSet, batch_size: int, sampled: bool,
               seed: int):
  """(batch, rows) over the training set, targets resampled from the model if `sampled`."""
  def gen():
    for index in common.chunks(train.num_examples, batch_size):
      batch = train.batch(index, pad_to=batch_size)
      if sampled:
        key = jax.random.fold_in(jax.random.key(seed), int(index[0]))
        batch = dict(batch, targets=np.asarray(_sampler(graphdef)(params, batch, key)))
      yield batch, len(index)
  return gen


_LAST_FIT: list = []  # [(params, train, settings, factors at damping 1)]: re-damped for free


def lm_fit(graphdef, params, train, attr) -> Factors:
  """Factors of the model over `train` (its first attr.ekfac_fit_examples examples when set);
  fitting again the same params and examples with only another damping (the LDS study's
  damping grid) reuses the last fit."""
  settings = (graphdef, attr.batch_size, attr.ekfac_sampled_labels, attr.ekfac_label_seed)
  sample = train
  if 0 < attr.ekfac_fit_examples < train.num_examples:  # the first examples
    sample = train.subset(np.arange(attr.ekfac_fit_examples))
  last = _LAST_FIT[0] if _LAST_FIT else None
  if (last and last[0] is params and last[2] == settings
      and np.array_equal(last[1].rows, sample.rows)
      and np.array_equal(last[1].lengths, sample.lengths)):
    base = last[3]
  else:
    base = fit(lm_loss(graphdef), lm_target, params,
               lm_batches(graphdef, params, sample, attr.batch_size, attr.ekfac_sampled_labels,
                          attr.ekfac_label_seed), 1.0)
    _LAST_FIT[:] = [(params, sample, settings, base)]
  return Factors({name: dataclasses.replace(layer, damping=attr.ekfac_damping * layer.damping)
                  for name, layer in base.layers.items()})


def lm_score(graphdef, params, factors: Factors, train, query: common.Query, length: int,
             batch_size: int) -> np.ndarray:
  pre = query_preconditioned(lm_loss(graphdef), lm_target, factors, params, query.batch(length))
  return score_batches(lm_loss(graphdef), lm_target, params, pre,
                       lm_batches(graphdef, params, train, batch_size, False, 0)())
