"""Attribution: exact maths on tiny models, index format and sharding, retrieval, LDS."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prism_jax.attribution import common, ekfac, graddot, index as index_lib, influence
from prism_jax.attribution import indexing, lds, prototype, run as run_lib
from prism_jax.attribution.config import AttributionConfig, apply_overrides
from prism_jax.config import ConfigError
from prism_jax.models import lm
from tests.synthetic import tiny_config

EXACT = ["model.vocab_size=32", "model.d_model=16", "model.d_ff=32", "model.num_layers=1",
         "model.num_heads=2", "prototypes.num_prototypes=8", "data.seq_len=8"]


def _rows(cfg, n, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, cfg.model.vocab_size, (n, cfg.data.seq_len + 1))


def _exact_head_terms(graphdef, params, train, query, length):
  """The obvious way over U (M*D): per-example gradients [E, P], query gradient [P] and the
  Gauss-Newton matrix [P, P] averaged over positions, from full Jacobians."""
  u = params["prototype_head"]["values"]

  def logits_fn(u_, batch):
    new = {**params, "prototype_head": {**params["prototype_head"], "values": u_}}
    return lm.forward(graphdef, new, batch).logits

  batch = train.batch(np.arange(train.num_examples))
  logits = jax.jit(logits_fn)(u, batch)
  jac = jax.jit(jax.jacobian(logits_fn))(u, batch).reshape(*logits.shape, -1)  # [B, L, V, M*D]
  p = jax.nn.softmax(logits, -1)
  mask = batch["loss_mask"] > 0
  n = int(mask.sum())
  gn = np.zeros((u.size, u.size))
  grads = np.zeros((train.num_examples, u.size))
  for e, t in zip(*np.nonzero(mask)):
    j, pt = np.asarray(jac[e, t], np.float64), np.asarray(p[e, t], np.float64)
    gn += j.T @ (np.diag(pt) - np.outer(pt, pt)) @ j / n
    grads[e] += j.T @ (pt - np.eye(len(pt))[batch["targets"][e, t]])
  qb = query.batch(length)
  g_q = jax.jit(jax.grad(lambda u_: jnp.sum(  # jit: one compile, not op-by-op dispatch
      optax.softmax_cross_entropy_with_integer_labels(logits_fn(u_, qb), qb["targets"])
      * qb["loss_mask"])))(u).reshape(-1)
  return grads, np.asarray(g_q, np.float64), gn


def _build(tmp_path, cfg, graphdef, params, train, attr=None, devices=None, name="index"):
  attr = attr or AttributionConfig(batch_size=4, neighbourhood_size=8, shard_prototypes=3,
                                   index_influence=True)
  out = str(tmp_path / name)
  indexing.build(cfg, graphdef, params, train, out, attr, devices=devices)
  return index_lib.Index(out)


@pytest.mark.parametrize("top_k", [1, 2])
def test_influence_equals_exact_damped_gauss_newton(tmp_path, top_k):
  cfg = tiny_config(*EXACT, f"prototypes.top_k={top_k}")
  graphdef, params = lm.init(cfg, 0)
  train = common.from_rows(_rows(cfg, 4))
  index = _build(tmp_path, cfg, graphdef, params, train, devices=jax.devices()[:1])
  query = common.Query(tuple(int(t) for t in _rows(cfg, 1, seed=7)[0, :5]), 3)
  damping = 1e-2
  grads, g_q, gn = _exact_head_terms(graphdef, params, train, query, cfg.data.seq_len)
  m, d = cfg.prototypes.num_prototypes, cfg.model.d_model
  curvature = gn
  if top_k > 1:
    # The method keeps the per-prototype diagonal blocks (cross terms of co-active
    # prototypes dropped): compare with the explicit block-diagonal GN.
    curvature = np.zeros_like(gn)
    for j in range(m):
      s = slice(j * d, (j + 1) * d)
      curvature[s, s] = gn[s, s]
    assert np.abs(gn - curvature).max() > 1e-6  # the cross terms really exist
  else:
    off_block = gn.copy()
    for j in range(m):
      off_block[j * d:(j + 1) * d, j * d:(j + 1) * d] = 0
    assert np.abs(off_block).max() == 0  # k = 1: the exact GN is block-diagonal
  exact = grads @ np.linalg.solve(curvature + damping * np.eye(len(g_q)), g_q)
  head = prototype.query_head(graphdef, params, query, cfg.data.seq_len)
  got = influence.score(index, head, damping).example_scores
  np.testing.assert_allclose(got, exact, rtol=2e-3, atol=1e-4 * np.abs(exact).max())


def test_ekfac_single_linear_layer_equals_closed_form():
  rng = np.random.default_rng(0)
  e, d_in, d_out = 24, 3, 4
  x = rng.normal(size=(e, d_in)).astype(np.float32)
  w = rng.normal(size=(d_in, d_out)).astype(np.float32)
  fit_labels = rng.integers(0, d_out, e)  # e.g. labels sampled from the model

  def loss_fn(params, batch):
    logits = batch["x"][:, 0] @ params["w"]
    logp = jax.nn.log_softmax(logits)
    return -jnp.sum(logp[jnp.arange(logits.shape[0]), batch["targets"][:, 0]])

  def batches(labels):
    return lambda: [({"x": x[:, None], "targets": labels[:, None],
                      "loss_mask": np.ones((e, 1), np.float32)}, e)]

  damping = 0.1
  factors = ekfac.fit(loss_fn, lambda n: n == "w", {"w": w}, batches(fit_labels), damping)
  query_x, query_y = rng.normal(size=(1, d_in)).astype(np.float32), np.array([2])
  query = {"x": query_x[:, None], "targets": query_y[:, None],
           "loss_mask": np.ones((1, 1), np.float32)}
  true_labels = rng.integers(0, d_out, e)
  pre = ekfac.query_preconditioned(loss_fn, lambda n: n == "w", factors, {"w": w}, query)
  got = ekfac.score_batches(loss_fn, lambda n: n == "w", {"w": w}, pre,
                            batches(true_labels)())

  # Closed form, written out: delta = softmax - onehot, G = x delta^T, explicit EK-FAC matrix.
  def grads(xs, ys):
    p = np.exp(xs @ w - (xs @ w).max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    delta = p - np.eye(d_out)[ys]
    return np.einsum("ei,eo->eio", xs, delta).astype(np.float64), xs, delta

  g_fit, xs, delta = grads(x, fit_labels)
  _, qa = np.linalg.eigh(xs.T.astype(np.float64) @ xs / e)
  _, qs = np.linalg.eigh(delta.T.astype(np.float64) @ delta / e)
  lam = np.mean(np.einsum("ia,eio,os->eas", qa, g_fit, qs) ** 2, axis=0)
  q_kron = np.kron(qa, qs)
  fisher = q_kron @ np.diag(lam.reshape(-1)) @ q_kron.T
  inverse = np.linalg.inv(fisher + damping * lam.mean() * np.eye(d_in * d_out))
  g_q = grads(query_x, query_y)[0].reshape(-1)
  expected = grads(x, true_labels)[0].reshape(e, -1) @ inverse @ g_q
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_lds_is_one_on_a_planted_linear_effect():
  rng = np.random.default_rng(0)
  subsets = rng.random((60, 30)) < 0.5
  effect_QxE = rng.normal(size=(5, 30))
  outputs = subsets.astype(float) @ effect_QxE.T  # the true outputs are exactly linear
  result = lds.summary(effect_QxE, subsets, np.stack([outputs, outputs]))
  assert result["lds"] == pytest.approx(1.0)
  assert result["low"] == pytest.approx(1.0) and result["high"] == pytest.approx(1.0)
  np.testing.assert_allclose(lds.noise_ceiling(np.stack([outputs, outputs])), 1.0)
  # Unrelated scores do not.
  assert abs(lds.summary(rng.normal(size=(5, 30)), subsets, outputs[None])["lds"]) < 0.5


def test_attribution_overrides():
  attr = apply_overrides(AttributionConfig(), ["attr.trak_projection_dim=64", "attr.damping=0.5"])
  assert attr.trak_projection_dim == 64 and attr.damping == 0.5
  with pytest.raises(ConfigError, match="did you mean 'attr.damping'"):
    apply_overrides(attr, ["attr.dampng=1"])
  with pytest.raises(ConfigError, match=r"attr\.trak_projection_dim.*must be"):
    apply_overrides(attr, ["attr.trak_projection_dim=0"])


# Shared with tests/test_lds.py: equal configs share retrain's compiled train step.
TRAINED_OVERRIDES = ("train.steps=150", "optimizer.warmup_steps=10")


@pytest.fixture(scope="module")
def trained():
  """A tiny PRISM model trained to fit 16 synthetic rows (the rows are its training set)."""
  from prism_jax.attribution import retrain

  cfg = tiny_config(*TRAINED_OVERRIDES)
  rows = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (16, cfg.data.seq_len + 1))
  train = common.from_rows(rows)
  graphdef, _ = lm.init(cfg, 0)
  return cfg, graphdef, retrain.fit(cfg, train, seed=0), train


def test_prototype_attribution_retrieves_the_training_example_first(trained, tmp_path):
  cfg, graphdef, params, train = trained
  # Neighbourhoods large enough to hold every position (the query's own included).
  prepared = run_prepare("prototype", cfg, graphdef, params, train, tmp_path,
                         neighbourhood_size=256)
  for example in range(16):
    query = common.query_from_example(train, example, 12)
    scores = prepared.query(query)
    assert common.top_examples(scores.example_scores, 1)[0] == example
    # The retrieved position is the query's own.
    token = scores.best_token[example]
    assert prepared_index(tmp_path).array("tokens/position.npy")[token] == 12


def run_prepare(method, cfg, graphdef, params, train, tmp_path, **attr):
  from prism_jax.attribution import run
  attr = AttributionConfig(**{"batch_size": 8, "neighbourhood_size": 16, **attr})
  return run.prepare(method, cfg, graphdef, params, train, attr,
                     index_dir=str(tmp_path / "index"))


def prepared_index(tmp_path):
  return index_lib.Index(str(tmp_path / "index"))


def test_index_identical_on_one_and_eight_devices(trained, tmp_path):
  cfg, graphdef, params, train = trained
  assert len(jax.devices()) == 8
  attr = AttributionConfig(batch_size=2, neighbourhood_size=8, shard_prototypes=10,
                           index_influence=True)
  one = _build(tmp_path, cfg, graphdef, params, train, attr, jax.devices()[:1], "one")
  eight = _build(tmp_path, cfg, graphdef, params, train, attr, jax.devices(), "eight")
  files = one.manifest["files"]
  assert files.keys() == eight.manifest["files"].keys()
  assert len(one.manifest["shards"]) == 4  # 32 prototypes in shards of 10
  for rel in files:
    np.testing.assert_array_equal(one.array(rel), eight.array(rel), err_msg=rel)
  assert one.manifest["bytes_total"] == eight.manifest["bytes_total"]
  # Format: memory-mapped arrays whose sizes the manifest records.
  grad = [rel for rel in files if rel.endswith("/grad.npy")]
  assert grad and all(rel.startswith("processes/00000/parts/") for rel in grad)
  arr = one.array(grad[0])
  assert isinstance(arr, np.memmap) and list(arr.shape) == files[grad[0]]["shape"]
  assert one.manifest["num_tokens"] == train.num_tokens() == 16 * cfg.data.seq_len
  assert one.manifest["num_examples"] == 16


def _planted_cycles(cfg, num_examples=8, cycle=3, seed=0):
  """Example e repeats its own cycle of `cycle` tokens; no token is shared between examples.
  A query copied from an example is then most like that example's own positions."""
  tokens = np.random.default_rng(seed).permutation(cfg.model.vocab_size)
  cycles = tokens[:num_examples * cycle].reshape(num_examples, cycle)
  return common.from_rows(np.stack([np.resize(c, cfg.data.seq_len + 1) for c in cycles]))


@pytest.mark.slow  # ~25 s on 2 cores: every method's preparation compiles once
def test_every_method_ranks_the_query_s_own_example_first(tmp_path):
  """On the planted cycles (random init: nothing memorised, gradients are not vanishing),
  a query copied from example e must score e above every other example, by every method."""
  cfg = tiny_config("model.num_layers=1")  # one layer: every method compiles faster
  graphdef, params = lm.init(cfg, 0)
  train = _planted_cycles(cfg)
  queries = [common.query_from_example(train, e, (3, 12)[e % 2])
             for e in range(train.num_examples)]
  for method in run_lib.METHODS:
    prepared = run_prepare(method, cfg, graphdef, params, train, tmp_path, batch_size=4,
                           neighbourhood_size=256, trak_projection_dim=32)
    for example, query in enumerate(queries):
      scores = prepared.query(query).example_scores
      assert scores.shape == (8,) and np.all(np.isfinite(scores)), method
      assert common.top_examples(scores, 1)[0] == example, (method, example, scores)


def test_graddot_equals_explicit_per_example_gradient_dots():
  """<grad L_q, grad L_e> with each gradient taken the obvious way: jax.grad of one unpadded
  sequence's summed next-token loss, flattened; rows of different lengths (padding unscored).
  A large init scale so that every parameter's gradient counts, not only the head's."""
  cfg = tiny_config(*EXACT, "model.init_std=0.5")
  graphdef, params = lm.init(cfg, 0)
  rows = _rows(cfg, 5)
  lengths = np.array([9, 9, 6, 9, 6])  # 6: as long as the query's row (fewer compiles)
  train = common.from_rows(rows, lengths)
  query = common.Query(tuple(int(t) for t in _rows(cfg, 1, seed=7)[0, :5]), 3)

  @jax.jit
  def grad(p, tokens, scored):  # scored: 1 where the next-token loss counts
    def loss(p):
      logits = lm.forward(graphdef, p, {"inputs": tokens[None, :-1]}).logits[0]
      logp = jax.nn.log_softmax(logits)
      return -jnp.sum(logp[jnp.arange(len(tokens) - 1), tokens[1:]] * scored)
    return jax.grad(loss)(p)

  def flat_grad(tokens, scored):
    grads = grad(params, np.asarray(tokens, np.int32), np.asarray(scored, np.float32))
    return np.concatenate([np.ravel(np.asarray(g, np.float64)) for g in jax.tree.leaves(grads)])

  g_q = flat_grad(query.prompt + (query.target,), np.eye(len(query.prompt))[query.position])
  expected = np.array([flat_grad(rows[e, :n], np.ones(n - 1)) @ g_q
                       for e, n in enumerate(lengths)])
  got = graddot.score(graphdef, params, train, query, cfg.data.seq_len, batch_size=2)
  np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())


def test_a_token_that_decodes_to_nothing_is_shown_as_it_reads():
  """sentencepiece decodes its bare space piece alone to '': the highlight and the query's
  target show it quoted (' '), a word piece as its text."""
  pieces = ["\u2581the", "\u2581", "Queen", "<0x0A>"]

  def decode(ids):  # sentencepiece's rule: '▁' is a space, the leading one dropped
    text = "".join("\n" if pieces[i] == "<0x0A>" else pieces[i] for i in ids)
    return text.replace("\u2581", " ").lstrip(" ")

  row = np.array([0, 1, 2, 3])
  assert decode([1]) == ""
  assert index_lib.span_text(row, 0, 8, decode) == "the [[' ']]"
  assert index_lib.span_text(row, 1, 8, decode) == "the  [[Queen]]"  # context 'the ', a word
  assert index_lib.span_text(row, 2, 8, decode) == "the Queen [['\\n']]"
  assert index_lib.token_text(decode, [0], 2) == "Queen"
