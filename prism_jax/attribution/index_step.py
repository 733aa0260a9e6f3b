"""The index pass's device step: one batch of chunks -> per-position records + curvature sums.

Runs under whatever mesh and logical-axis rules are active (the training run's, entered by
`with run:`), on parameters laid out like training. Only small per-position arrays leave
the device: the top-k prototypes, the top-r softmax entries (top-r is taken on device; the
[B, L, V] softmax is never copied to the host) and p_t[y_t]. The per-prototype curvature
statistics stay on the device and are summed across steps:

  Pi_j += sum_t a_tj^2 p_t            [M, V]
  S_j  += sum_t a_tj^2 m_t m_t^T      [M, D, D],   m_t = E^T p_t

(G_j = 1/N [E^T diag(Pi_j) E - S_j], see curvature.py); with attr.curvature=none there are
no sums and the step is the forward pass plus the top-r. The sums are dense einsums over the
[B, L, M] activations (zero outside each position's top-k): a matmul, not a scatter. With a
shared basis Q (attr.curvature=shared) S_j is replaced by its diagonal in that basis,
  Sq_j += sum_t a_tj^2 (Q^T m_t)^2     [M, D]
which costs B L M D per step instead of B L M D^2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from prism_jax import sharding
from prism_jax.models import lm

PI_AXES = ("prototypes", "vocab")
S_AXES = ("prototypes", None, None)
SQ_AXES = ("prototypes", None)


def _forward(graphdef, params, batch, top_r: int, with_grad: bool):
  """(per-position records, p [B, L, V], activations [B, L, M], E [V, D]) of one batch."""
  out = lm.forward(graphdef, params, batch)
  protos = out.prototypes
  e_VxD = lm.unembedding(params).astype(jnp.float32)
  p_BxLxV = jax.nn.softmax(out.logits.astype(jnp.float32), axis=-1)
  probs, ids = jax.lax.top_k(p_BxLxV, top_r)
  p_target = jnp.take_along_axis(p_BxLxV, batch["targets"][..., None], -1)[..., 0]
  values_MxD = params["prototype_head"]["values"].astype(jnp.float32)
  mix_BxLxD = jnp.einsum("blk,blkd->bld", protos.top_values.astype(jnp.float32),
                         jnp.take(values_MxD, protos.top_indices, axis=0))
  records = {"top_values": protos.top_values, "top_indices": protos.top_indices,
             "softmax_ids": ids, "softmax_probs": probs, "p_target": p_target,
             "mix_norm": jnp.linalg.norm(mix_BxLxD, axis=-1)}
  if with_grad:  # g_t = E^T (p_t - e_{y_t}), for `influence` only (N x D: small N)
    m_BxLxD = jnp.einsum("blv,vd->bld", p_BxLxV, e_VxD)
    records["grad"] = m_BxLxD - jnp.take(e_VxD, batch["targets"], 0)
  return records, p_BxLxV, protos.activations, e_VxD


def token_records(graphdef, top_r: int, with_grad: bool):
  """fn(params, batch) -> per-position arrays [B, L, ...] (see the module docstring)."""
  return lambda params, batch: _forward(graphdef, params, batch, top_r, with_grad)[0]


def step(graphdef, top_r: int, with_grad: bool):
  """fn(params, batch, sums[, basis]) -> (records, sums + this batch's statistics); sums
  hold "s" [M, D, D] (exact blocks) or "sq" [M, D] (diagonal in the shared `basis` [D, D])."""

  def fn(params, batch, sums, basis=None):
    records, p_BxLxV, act_BxLxM, e_VxD = _forward(graphdef, params, batch, top_r, with_grad)
    if not sums:  # attr.curvature=none
      return records, sums
    a2_BxLxM = jnp.square(act_BxLxM) * batch["loss_mask"][..., None]
    m_BxLxD = jnp.einsum("blv,vd->bld", p_BxLxV, e_VxD)
    out = {"pi": sums["pi"] + sharding.constrain(jnp.einsum("blm,blv->mv", a2_BxLxM, p_BxLxV),
                                                 PI_AXES)}
    if "s" in sums:
      out["s"] = sums["s"] + sharding.constrain(
          jnp.einsum("blm,bld,ble->mde", a2_BxLxM, m_BxLxD, m_BxLxD), S_AXES)
    else:
      mq_BxLxD = jnp.einsum("bld,de->ble", m_BxLxD, basis.astype(jnp.float32))
      out["sq"] = sums["sq"] + sharding.constrain(
          jnp.einsum("blm,bld->md", a2_BxLxM, jnp.square(mq_BxLxD)), SQ_AXES)
    return records, out

  return fn


AXES = {"pi": PI_AXES, "s": S_AXES, "sq": SQ_AXES}


def sum_shapes(curvature: str, m: int, v: int, d: int) -> dict:
  """The curvature sums' shapes for attr.curvature (none: no sums)."""
  return {"none": {}, "shared": {"pi": (m, v), "sq": (m, d)},
          "blocks": {"pi": (m, v), "s": (m, d, d)}}[curvature]


def zero_sums(mesh, m: int, v: int, d: int, curvature: str = "blocks") -> dict:
  """Zero curvature sums laid out on `mesh` by the active rules (the bank on its axis)."""
  shapes = sum_shapes(curvature, m, v, d)
  shardings = {k: NamedSharding(mesh, sharding.logical_to_spec(AXES[k])) for k in shapes}
  return jax.jit(lambda: {k: jnp.zeros(shapes[k], jnp.float32) for k in shapes},
                 out_shardings=shardings)()


def put_sums(mesh, host: dict) -> dict:
  """Host arrays (a resumed build's saved sums) -> device arrays laid out like zero_sums."""
  return {k: jax.make_array_from_callback(
              v.shape, NamedSharding(mesh, sharding.logical_to_spec(AXES[k])),
              lambda i, v=v: v[i]) for k, v in host.items()}
