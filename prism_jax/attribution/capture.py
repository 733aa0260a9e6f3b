"""Inputs and output-gradients of chosen linear layers, read from the traced computation.

EK-FAC needs, per token, each projection's input x_t and the loss gradient at its output
delta_t (kronfluence gets them with module hooks). Here the loss function is traced to a
jaxpr and re-evaluated by a small interpreter: every `dot_general` whose one operand is a
target parameter (possibly cast/transposed/reshaped) records its other operand and gets a
zero "probe" added to its output; the gradient with respect to the probe is delta. So the
model code is used as is, whatever einsums it writes.

A site's per-token vectors: x [T, in] (in = the contracted dims) and delta [T, out]
(out = the weight's free dims); the layer's weight gradient is sum_t x_t delta_t^T.

Beyond plain matmuls, so that every trained matrix is a site:
- `lax.scan` over stacked layers (model.scan_layers) is unrolled by the interpreter; the
  stacked weight's slice for layer i is its own site, named `NAME[i]`.
- an embedding lookup (a row `gather` from a target table [V, D]) is the matmul
  one_hot(ids) @ table: x = one_hot [T, V], delta = the gradient at the looked-up rows.
  A tied embedding is then two sites (lookup and unembedding), each its own block.
- a target scaled elementwise by something else of broadcastable shape (the prototype
  keys' unit normalisation for cosine similarity) keeps its tag: the site's weight is the
  scaled copy (here the unit keys), the Jacobian of the scaling is not applied.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.extend.core import Literal

_LAYOUT = {"convert_element_type", "transpose", "reshape", "copy", "copy_p"}
_CALLS = {"jit", "pjit", "closed_call", "core_call", "checkpoint", "remat2", "remat"}


class _Context:

  def __init__(self, probes):
    self.probes = probes  # None on the discovery pass
    self.sites = []       # (name, x [T, in], out shape, x_is_lhs, n_x_free)

  def site(self, tag, lhs, rhs, dims, out):
    (lc, rc), (lb, rb) = dims
    if lb or rb:
      return out
    x_is_lhs = tag[1] == 1  # the parameter is the rhs
    x, xc = (lhs, lc) if x_is_lhs else (rhs, rc)
    free = [d for d in range(x.ndim) if d not in xc]
    x_2d = jnp.transpose(x, free + list(xc)).reshape(
        math.prod(x.shape[d] for d in free), math.prod(x.shape[d] for d in xc))
    return self.record(tag[0], x_2d, out, x_is_lhs, len(free))

  def lookup(self, tag, table, indices, params, out):
    """A row gather table[ids] as one_hot(ids) @ table (other gathers are not sites)."""
    dn = params["dimension_numbers"]
    rows = (table.ndim == 2 and dn.collapsed_slice_dims == (0,) and dn.start_index_map == (0,)
            and tuple(params["slice_sizes"]) == (1, table.shape[1])
            and dn.offset_dims == (out.ndim - 1,) and indices.shape[-1] == 1
            and not dn.operand_batching_dims)
    if not rows:
      return out
    x_2d = jax.nn.one_hot(indices.reshape(-1), table.shape[0], dtype=jnp.float32)
    return self.record(tag, x_2d, out, True, out.ndim - 1)

  def record(self, name, x_2d, out, x_is_lhs, n_free):
    used = sum(1 for s in self.sites if s[0].split("#")[0] == name)
    name = name if not used else f"{name}#{used}"
    self.sites.append((name, x_2d, out.shape, x_is_lhs, n_free))
    if self.probes is None:
      return out
    return out + self.probes[name]


def _eval(jaxpr, consts, args, tags, ctx: _Context):
  env, tag_of = {}, {}
  for v, c in zip(jaxpr.constvars, consts):
    env[v] = c
  for v, a, t in zip(jaxpr.invars, args, tags):
    env[v] = a
    if t is not None:
      tag_of[v] = t

  def read(v):
    return v.val if isinstance(v, Literal) else env[v]

  def tag(v):
    return None if isinstance(v, Literal) else tag_of.get(v)

  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    intags = [tag(v) for v in eqn.invars]
    name = eqn.primitive.name
    if name in _CALLS and "jaxpr" in eqn.params:
      sub = eqn.params["jaxpr"]
      inner, inner_consts = (sub.jaxpr, sub.consts) if hasattr(sub, "jaxpr") else (sub, [])
      outs = _eval(inner, inner_consts, invals, intags, ctx)
    elif name == "scan" and any(intags):
      outs = _unrolled_scan(eqn.params, invals, intags, ctx)
    else:
      with eqn.ctx.manager:
        outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
      outs = outs if eqn.primitive.multiple_results else [outs]
      if name == "dot_general" and (intags[0] or intags[1]) and not (intags[0] and intags[1]):
        side = 0 if intags[0] else 1
        outs = [ctx.site((intags[side], side), invals[0], invals[1],
                         eqn.params["dimension_numbers"], outs[0])]
      elif name == "gather" and intags[0] and not intags[1]:
        outs = [ctx.lookup(intags[0], invals[0], invals[1], eqn.params, outs[0])]
      elif name in _LAYOUT and intags and intags[0]:
        tag_of[eqn.outvars[0]] = intags[0]
      elif name == "mul" and bool(intags[0]) != bool(intags[1]):
        side = 0 if intags[0] else 1
        if outs[0].shape == invals[side].shape:  # the target, rescaled (unit keys)
          tag_of[eqn.outvars[0]] = intags[side]
    for v, o in zip(eqn.outvars, outs):
      env[v] = o
  return [read(v) for v in jaxpr.outvars]


def _unrolled_scan(params, invals, intags, ctx: _Context):
  """lax.scan evaluated step by step, so that layer i's slice of a stacked target is a site
  of its own (`NAME[i]`)."""
  body, n_consts, n_carry = params["jaxpr"], params["num_consts"], params["num_carry"]
  consts, carry = invals[:n_consts], invals[n_consts:n_consts + n_carry]
  xs, x_tags = invals[n_consts + n_carry:], intags[n_consts + n_carry:]
  steps = range(params["length"])
  ys = []
  for i in (reversed(steps) if params["reverse"] else steps):
    tags = (list(intags[:n_consts]) + [None] * n_carry
            + [None if t is None else f"{t}[{i}]" for t in x_tags])
    outs = _eval(body.jaxpr, body.consts, list(consts) + list(carry) + [x[i] for x in xs],
                 tags, ctx)
    carry, y = outs[:n_carry], outs[n_carry:]
    ys.append(y)
  if params["reverse"]:
    ys.reverse()
  stacked = [jnp.stack([y[k] for y in ys]) for k in range(len(ys[0]))] if ys else []
  return list(carry) + stacked


def _delta_2d(delta, shape, x_is_lhs, n_x_free):
  """Output gradient in [x free..., w free...] order as [T, out]."""
  nd = len(shape)
  if not x_is_lhs:  # output dims are (w free..., x free...)
    n_w = nd - n_x_free
    delta = jnp.transpose(delta, list(range(n_w, nd)) + list(range(n_w)))
  tokens = math.prod(delta.shape[:n_x_free])
  return delta.reshape(tokens, -1)


def path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def layer_io(fn: Callable, is_target: Callable[[str], bool]):
  """Wraps scalar `fn(params, *args)` into `(params, *args) -> (value, {site: (x, delta)})`."""

  def run(params, *args):
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = [leaf for _, leaf in with_paths]
    names = [path_name(path) for path, _ in with_paths]
    flat_args, args_def = jax.tree.flatten(args)
    closed = jax.make_jaxpr(lambda l, a: fn(jax.tree.unflatten(treedef, l),
                                            *jax.tree.unflatten(args_def, a)))(leaves, flat_args)
    tags = [n if is_target(n) else None for n in names] + [None] * len(flat_args)

    def evaluate(probes):
      ctx = _Context(probes)
      out = _eval(closed.jaxpr, closed.consts, leaves + flat_args, tags, ctx)
      return out[0], ctx

    _, discovered = evaluate(None)  # shapes only; unused values are dead code under jit
    meta = {s[0]: (s[2], s[3], s[4]) for s in discovered.sites}
    zeros = {name: jnp.zeros(m[0], jnp.float32) for name, m in meta.items()}

    def value_and_inputs(probes):
      value, ctx = evaluate(probes)
      return value, {s[0]: s[1] for s in ctx.sites}

    (value, xs), deltas = jax.value_and_grad(value_and_inputs, has_aux=True)(zeros)
    return value, {n: (xs[n], _delta_2d(deltas[n], *meta[n])) for n in meta}

  return run
