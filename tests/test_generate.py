"""KV-cache decoding, sampling, and generation with prototype contributions."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prism_jax import sampling
from prism_jax.models import lm
from tests.text_model import CharTokenizer
from tests.synthetic import count_backend_compiles, tiny_config


@pytest.mark.parametrize("exp,layout", [("prism_tiny", "false"), ("prism_tiny", "true"),
                                        ("dense_tiny", "false")])
def test_kv_cache_decode_equals_full_forward_at_every_position(exp, layout):
  cfg = tiny_config(f"model.scan_layers={layout}", "model.max_seq_len=32", exp=exp)
  graphdef, params = lm.init(cfg, 1)
  rng = np.random.default_rng(0)
  tokens_BxL = rng.integers(0, cfg.model.vocab_size, (2, 20)).astype(np.int32)
  # jit: one compile, not op-by-op dispatch of the whole model.
  full = jax.jit(lambda p, x: lm.forward(graphdef, p, {"inputs": x}))(params, tokens_BxL)
  step = jax.jit(lambda p, t, pos, c, i: lm.decode(graphdef, p, t, pos, c, i))
  cache = lm.init_cache(cfg, batch=2)
  positions = np.tile(np.arange(20, dtype=np.int32), (2, 1))
  # Prefill 6 tokens at once, then one token per call.
  out, cache = step(params, tokens_BxL[:, :6], positions[:, :6], cache, 0)
  logits, indices = [out.logits], [None if out.prototypes is None else out.prototypes.top_indices]
  for i in range(6, 20):
    out, cache = step(params, tokens_BxL[:, i:i + 1], positions[:, i:i + 1], cache, i)
    logits.append(out.logits)
    indices.append(None if out.prototypes is None else out.prototypes.top_indices)
  np.testing.assert_allclose(np.concatenate(logits, 1), full.logits, rtol=1e-5, atol=1e-5)
  if full.prototypes is not None:
    np.testing.assert_array_equal(np.concatenate(indices, 1), full.prototypes.top_indices)


def _logits_at(graphdef, params, ids):
  return np.asarray(_jit_forward(graphdef, params, np.asarray([ids], np.int32)).logits[0])


@functools.partial(jax.jit, static_argnums=0)  # compiled once per graphdef and length
def _jit_forward(graphdef, params, inputs):
  return lm.forward(graphdef, params, {"inputs": inputs})


def test_generated_contributions_sum_to_the_tokens_logit():
  cfg = tiny_config("model.max_seq_len=32")
  graphdef, params = lm.init(cfg, 0)
  tok = CharTokenizer()
  prompt_ids = sampling.encode_prompt(tok, "the cat")
  gen = sampling.Generator(graphdef, cfg, sampling.Sampling(temperature=1.0, top_k=20))(
      params, prompt_ids, max_new_tokens=10, seed=3)
  result = json.loads(json.dumps(sampling.to_json(gen, tok, "the cat", {})))
  assert len(result["tokens"]) == 10
  ids = prompt_ids + gen.token_ids
  reference = _logits_at(graphdef, params, ids)
  for t, step in enumerate(result["tokens"]):
    parts = [p["contribution"] for p in step["prototypes"]]
    assert len(parts) == cfg.prototypes.top_k
    assert parts == sorted(parts, reverse=True)
    assert all(p["activation"] >= 0 for p in step["prototypes"])
    np.testing.assert_allclose(sum(parts), step["logit"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(step["contribution_sum"], step["logit"], rtol=1e-4, atol=1e-4)
    # ... and the logit is that of the generated token in an independent full forward pass.
    position = len(prompt_ids) - 1 + t
    np.testing.assert_allclose(step["logit"], reference[position, step["id"]], rtol=1e-4,
                               atol=1e-4)
  assert result["completion"] == tok.decode(gen.token_ids)
  text = sampling.format_contributions(result, shown=2)
  assert len(text.splitlines()) == 10 and "more" in text


@functools.lru_cache(maxsize=None)
def _greedy(exp):
  """(graphdef, params, Generator), shared so that its compiled steps are reused."""
  cfg = tiny_config("model.max_seq_len=32", exp=exp)
  graphdef, params = lm.init(cfg, 2)
  return graphdef, params, sampling.Generator(graphdef, cfg, sampling.Sampling(temperature=0.0))


@pytest.mark.parametrize("exp", ["prism_tiny", "dense_tiny"])
def test_cache_and_no_cache_generate_the_same_tokens(exp):
  graphdef, params, gen = _greedy(exp)
  with_cache = gen(params, [1, 5, 9, 11], 12, use_cache=True)
  without = gen(params, [1, 5, 9, 11], 12, use_cache=False)
  assert with_cache.token_ids == without.token_ids
  np.testing.assert_allclose([s["logit"] for s in with_cache.steps],
                             [s["logit"] for s in without.steps], rtol=1e-5, atol=1e-5)
  # Greedy picks the argmax of the full forward pass at each step.
  reference = _logits_at(graphdef, params, [1, 5, 9, 11] + with_cache.token_ids)
  assert with_cache.token_ids == [int(reference[3 + t].argmax()) for t in range(12)]


def test_decode_step_traces_and_compiles_once():
  """The KV-cache decode step is traced and compiled once, then reused for every token,
  position and prompt; only a new prompt length compiles (its prefill) again."""
  _, params, gen = _greedy("prism_tiny")
  gen(params, [1, 5, 9, 11], 12)
  with count_backend_compiles() as same_length:
    gen(params, [2, 7, 3, 8], 12, seed=1)
  with count_backend_compiles() as new_length:
    gen(params, [4, 6, 10], 12)
  assert gen.traces["decode_step"] == 1, gen.traces
  assert same_length.count == 0
  assert new_length.count == 1 and gen.traces["prefill"] == 2, (new_length.count, gen.traces)


def test_sampling_filters():
  logits = jnp.asarray([[0.0, 3.0, 1.0, 2.0]])
  key = jax.random.key(0)
  top1 = sampling.filter_logits(logits, sampling.Sampling(top_k=1))
  assert np.isfinite(np.asarray(top1)).tolist() == [[False, True, False, False]]
  top2 = sampling.filter_logits(logits, sampling.Sampling(top_k=2))
  assert np.isfinite(np.asarray(top2)).tolist() == [[False, True, False, True]]
  # p(3.0) ~ 0.64 < 0.7, so the nucleus needs the second token too.
  nucleus = sampling.filter_logits(logits, sampling.Sampling(top_p=0.7))
  assert np.isfinite(np.asarray(nucleus)).tolist() == [[False, True, False, True]]
  draws = [int(sampling.sample_token(logits, jax.random.fold_in(key, i),
                                     sampling.Sampling(top_k=2))[0]) for i in range(40)]
  assert set(draws) == {1, 3}
  assert int(sampling.sample_token(logits, key, sampling.Sampling(temperature=0.0))[0]) == 1


def test_prompt_longer_than_the_context_is_a_user_error():
  cfg = tiny_config("model.max_seq_len=16")
  graphdef, params = lm.init(cfg, 0)
  gen = sampling.Generator(graphdef, cfg, sampling.Sampling(temperature=0.0))
  with pytest.raises(sampling.UserError, match="longer than the model's context of 16"):
    gen(params, list(range(3, 20)), 4)
