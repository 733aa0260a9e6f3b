"""Linear prototype controllers: a' = relu((1 + g) * a + b) on the active prototypes.

The model is frozen. The top-k selection does not depend on (g, b) (the controller acts
after it, see `prism_head.apply_controller`), so one forward pass per request gives every
scored position's (top_values, top_indices, target): `ChoiceFeatures`. From those the
controlled log-likelihood of every choice is exact and cheap (head only), and the controller
is fitted by minimising the cross-entropy of the gold choice over the choices' summed
log-likelihoods plus an L1 penalty (proximal steps, so most g are exactly zero).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from prism_jax.control import records
from prism_jax import layout
from prism_jax.errors import UserError
from prism_jax.models.prism_head import Controller

FORMAT = "prism-controller/1"


def zeros(num_prototypes: int) -> Controller:
  """The identity controller (g = b = 0)."""
  return Controller(gain_M=jnp.zeros(num_prototypes, jnp.float32),
                    bias_M=jnp.zeros(num_prototypes, jnp.float32))


@dataclasses.dataclass(frozen=True)
class FitConfig:
  steps: int = 400
  learning_rate: float = 0.03
  l1_gain: float = 3e-3     # per unit |g|, added to the mean choice cross-entropy
  l1_bias: float = 3e-3     # per unit |b|
  batch_examples: int = 64  # at most this many examples per optimisation step ...
  batch_positions: int = 2048  # ... and at most this many scored positions (vocab passes)
  seed: int = 0


@dataclasses.dataclass
class ChoiceFeatures:
  """Frozen-model features of E multiple-choice examples with up to C choices.

  Scored positions are kept flat (N of them, no padding): position n is a continuation
  token of choice `choice[n]` of example `example[n]`.
  """
  top_values: np.ndarray   # [N, k] float32 selected activations a
  top_indices: np.ndarray  # [N, k] int32 their prototype ids
  targets: np.ndarray      # [N] int32 the continuation token scored there
  example: np.ndarray      # [N] int32
  choice: np.ndarray       # [N] int32
  choice_mask: np.ndarray  # [E, C] bool real choices
  labels: np.ndarray       # [E] int32 gold choice

  @property
  def num_examples(self) -> int:
    return int(self.labels.shape[0])

  @property
  def num_choices(self) -> int:
    return int(self.choice_mask.shape[1])

  def positions_per_example(self) -> np.ndarray:
    return np.bincount(self.example, minlength=self.num_examples)

  def pack(self, examples: np.ndarray, max_positions: int, max_examples: int) -> dict:
    """The given examples as one fixed-shape batch (padding has mask 0 / weight 0)."""
    k, c = self.top_values.shape[1], self.num_choices
    select = np.flatnonzero(np.isin(self.example, examples))
    local = np.full(self.num_examples, -1, np.int64)
    local[examples] = np.arange(len(examples))
    n = len(select)
    batch = {"top_values": np.zeros((max_positions, k), np.float32),
             "top_indices": np.zeros((max_positions, k), np.int32),
             "targets": np.zeros(max_positions, np.int32),
             "mask": np.zeros(max_positions, np.float32),
             "row": np.zeros(max_positions, np.int32),
             "choice_mask": np.ones((max_examples, c), bool),
             "labels": np.zeros(max_examples, np.int32),
             "weight": np.zeros(max_examples, np.float32)}
    batch["top_values"][:n], batch["top_indices"][:n] = (self.top_values[select],
                                                         self.top_indices[select])
    batch["targets"][:n], batch["mask"][:n] = self.targets[select], 1.0
    batch["row"][:n] = local[self.example[select]] * c + self.choice[select]
    e = len(examples)
    batch["choice_mask"][:e] = self.choice_mask[examples]
    batch["labels"][:e] = self.labels[examples]
    batch["weight"][:e] = 1.0
    return batch

  def batches(self, max_positions: int, max_examples: int, rng: np.random.Generator):
    """Endless packed batches: shuffled examples, greedily filled to the position budget."""
    sizes = self.positions_per_example()
    max_positions = max(max_positions, int(sizes.max()))
    while True:
      order, current, used = rng.permutation(self.num_examples), [], 0
      for e in order:
        if current and (used + sizes[e] > max_positions or len(current) == max_examples):
          yield self.pack(np.asarray(current), max_positions, max_examples)
          current, used = [], 0
        current.append(e)
        used += sizes[e]
      if current:
        yield self.pack(np.asarray(current), max_positions, max_examples)


def controlled_values(top_values, top_indices, controller: Controller):
  """a' at the selected entries: the same formula as `prism_head.apply_controller`."""
  gain = controller.gain_M[top_indices]
  bias = controller.bias_M[top_indices]
  return jnp.where(top_values > 0, jax.nn.relu((1.0 + gain) * top_values + bias), 0.0)


def position_logprobs(controller: Controller, values_MxD, unembedding_VxD, top_values_Nxk,
                      top_indices_Nxk, targets_N):
  """log P(target) at each position under the controller: logits = (a' U) E^T, as the head."""
  a = controlled_values(top_values_Nxk, top_indices_Nxk, controller)
  u = jnp.take(values_MxD.astype(jnp.float32), top_indices_Nxk, axis=0)   # [N, k, D]
  logits = jnp.einsum("nk,nkd,vd->nv", a, u, unembedding_VxD.astype(jnp.float32))
  target_logit = jnp.take_along_axis(logits, targets_N[:, None], axis=-1)[:, 0]
  return target_logit - jax.nn.logsumexp(logits, axis=-1)


def batch_choice_scores(controller, values_MxD, unembedding_VxD, batch: dict):
  """Summed log P(continuation) per (example, choice) of a packed batch, [E_b, C]."""
  logp = position_logprobs(controller, values_MxD, unembedding_VxD, batch["top_values"],
                           batch["top_indices"], batch["targets"])
  e, c = batch["choice_mask"].shape
  sums = jax.ops.segment_sum(logp * batch["mask"], batch["row"], num_segments=e * c)
  return sums.reshape(e, c)


def choice_loss(controller, values_MxD, unembedding_VxD, batch: dict):
  """Mean cross-entropy of the gold choice, the choices' summed log-likelihoods as logits."""
  scores = batch_choice_scores(controller, values_MxD, unembedding_VxD, batch)
  scores = jnp.where(batch["choice_mask"], scores, -1e30)
  ce = optax.softmax_cross_entropy_with_integer_labels(scores, batch["labels"])
  return jnp.sum(ce * batch["weight"]) / jnp.maximum(jnp.sum(batch["weight"]), 1.0)


def choice_scores(controller, values_MxD, unembedding_VxD, features: ChoiceFeatures,
                  max_positions: int = 4096) -> np.ndarray:
  """Summed log P(continuation) of every choice, [E, C] (-inf for missing choices)."""
  fn = jax.jit(position_logprobs)
  logp = np.zeros(len(features.targets), np.float64)
  for start in range(0, len(logp), max_positions):
    sl = slice(start, start + max_positions)
    logp[sl] = np.asarray(fn(controller, values_MxD, unembedding_VxD,
                             features.top_values[sl], features.top_indices[sl],
                             features.targets[sl]))
  scores = np.zeros(features.choice_mask.shape, np.float64)
  np.add.at(scores, (features.example, features.choice), logp)
  return np.where(features.choice_mask, scores, -np.inf)


def accuracy(controller, values_MxD, unembedding_VxD, features: ChoiceFeatures) -> float:
  scores = choice_scores(controller, values_MxD, unembedding_VxD, features)
  return float(np.mean(np.argmax(scores, -1) == features.labels))


def _soft_threshold(x, t):
  return jnp.sign(x) * jnp.maximum(jnp.abs(x) - t, 0.0)


def fit(features: ChoiceFeatures, values_MxD, unembedding_VxD, num_prototypes: int,
        cfg: FitConfig = FitConfig(), progress: bool = True) -> tuple[Controller, list[float]]:
  """Fits (g, b) on `features`; returns the controller and the loss curve (per step).

  Proximal Adam: optax's Adam direction on the smooth cross-entropy, then the L1 proximal
  step in Adam's own diagonal metric (threshold lr * l1 / (sqrt(v_hat) + eps) per entry), so
  entries whose gradient cannot pay their L1 cost sit at exactly zero and the correction
  names few prototypes. Batches pack whole examples up to a fixed position budget: one shape
  compiles and no padding position costs a vocabulary pass.
  """
  b2, eps = 0.999, 1e-8
  tx = optax.scale_by_adam(b2=b2, eps=eps)
  controller = zeros(num_prototypes)
  opt_state = tx.init(controller)
  values = jnp.asarray(values_MxD, jnp.float32)
  unembed = jnp.asarray(unembedding_VxD, jnp.float32)
  l1 = Controller(gain_M=jnp.float32(cfg.l1_gain), bias_M=jnp.float32(cfg.l1_bias))

  @jax.jit
  def step(controller, opt_state, batch):
    loss, grads = jax.value_and_grad(choice_loss)(controller, values, unembed, batch)
    direction, opt_state = tx.update(grads, opt_state, controller)
    nu_hat = jax.tree.map(lambda nu: nu / (1.0 - b2 ** opt_state.count), opt_state.nu)
    controller = jax.tree.map(
        lambda x, d, nu, lam: _soft_threshold(x - cfg.learning_rate * d,
                                              cfg.learning_rate * lam / (jnp.sqrt(nu) + eps)),
        controller, direction, nu_hat, l1)
    penalty = (cfg.l1_gain * jnp.sum(jnp.abs(controller.gain_M))
               + cfg.l1_bias * jnp.sum(jnp.abs(controller.bias_M)))
    return controller, opt_state, loss + penalty

  batches = features.batches(cfg.batch_positions, cfg.batch_examples,
                             np.random.default_rng(cfg.seed))
  losses = []
  for _ in tqdm(range(cfg.steps), desc="fit controller", unit="step", disable=not progress,
                leave=False):
    controller, opt_state, loss = step(controller, opt_state, next(batches))
    losses.append(float(loss))
  return controller, losses


def strongest(controller: Controller, count: int) -> list[dict]:
  """The prototypes carrying the correction: largest |g| first (ties by |b|), non-zero only."""
  gain = np.asarray(controller.gain_M, np.float64)
  bias = np.asarray(controller.bias_M, np.float64)
  order = np.lexsort((-np.abs(bias), -np.abs(gain)))
  rows = [{"prototype": int(j), "gain": float(gain[j]), "bias": float(bias[j])}
          for j in order if gain[j] != 0 or bias[j] != 0]
  return rows[:count]


# ------------------------------------------------------------------------------------------
# On disk, beside the checkpoint: <workdir>/controllers/<task>.json


def default_path(workdir: str, task: str) -> str:
  return layout.path(workdir, layout.CONTROLLERS, f"{task}.json")


def save(path: str, controller: Controller, meta: dict) -> str:
  return records.save(path, {
      "format": FORMAT, **meta,
      "num_prototypes": int(controller.gain_M.shape[0]),
      "gain": [float(x) for x in np.asarray(controller.gain_M, np.float32)],
      "bias": [float(x) for x in np.asarray(controller.bias_M, np.float32)]})


def load(path: str, num_prototypes: int | None = None) -> Controller:
  """A saved controller; UserError when missing, malformed or for another bank size."""
  gain, bias = records.load(
      path, FORMAT, "controller",
      "fit one with python -m prism_jax.main.control calibrate --task NAME",
      lambda r: (np.asarray(r["gain"], np.float32), np.asarray(r["bias"], np.float32)))
  if gain.shape != bias.shape or gain.ndim != 1:
    raise UserError(f"controller {path}: gain and bias must be two lists of the same length")
  if not (np.isfinite(gain).all() and np.isfinite(bias).all()):
    raise UserError(f"controller {path}: gain and bias must be finite numbers")
  if num_prototypes is not None and gain.shape[0] != num_prototypes:
    raise UserError(f"controller {path} has {gain.shape[0]} prototypes, the model has "
                    f"{num_prototypes}")
  return Controller(gain_M=jnp.asarray(gain), bias_M=jnp.asarray(bias))


def summary(rows: Sequence[dict]) -> str:
  return ", ".join(f"p{r['prototype']} g={r['gain']:+.3f} b={r['bias']:+.3f}" for r in rows)
