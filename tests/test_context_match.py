"""Context fingerprints: equal exactly when the model read the same recent tokens."""

import numpy as np

from prism_jax.attribution import context_match


def test_a_prompt_matches_the_row_it_was_cut_from_at_every_length():
  rng = np.random.default_rng(0)
  row = rng.integers(0, 1000, (1, 40))
  prints = context_match.fingerprints(row)
  assert prints.dtype == np.uint32 and prints.shape == (1, 40)
  for end in range(1, 41):
    assert context_match.of_prompt(row[0, :end]) == prints[0, end - 1]


def test_only_the_last_n_tokens_count_and_a_shorter_context_is_another_context():
  n = context_match.CONTEXT_TOKENS
  rng = np.random.default_rng(1)
  tail = rng.integers(0, 1000, n)
  a = np.concatenate([rng.integers(0, 1000, 5), tail])
  b = np.concatenate([rng.integers(0, 1000, 9), tail])
  assert context_match.of_prompt(a) == context_match.of_prompt(b)  # same last n tokens
  changed = b.copy()
  changed[-n] += 1  # the oldest token that counts
  assert context_match.of_prompt(changed) != context_match.of_prompt(b)
  # A row that starts with the tail: the model read only those n - 1 tokens, not the n.
  assert context_match.of_prompt(tail[1:]) != context_match.of_prompt(b)
  # Token 0 is a token, not "before the row": a prompt of one 0 differs from [0, 0].
  assert context_match.of_prompt([0]) != context_match.of_prompt([0, 0])


def test_fingerprints_spread_over_32_bits():
  rng = np.random.default_rng(2)
  rows = rng.integers(0, 8192, (64, 128))
  n = context_match.CONTEXT_TOKENS
  contexts = {tuple(row[max(0, p - n + 1):p + 1]) + (min(p + 1, n),)
              for row in rows for p in range(128)}
  prints = context_match.fingerprints(rows).ravel()
  assert len(np.unique(prints)) == len(contexts) > 8000  # one per distinct context
  assert prints.max() > 2**31 and prints.min() < 2**24  # uniform: min ~ 2^32 / 8192


def test_the_boost_is_one_plus_the_weight_on_matches_only():
  prints = np.array([5, 7, 5, 9], np.uint32)
  np.testing.assert_array_equal(context_match.boost(5, prints, 3.0), [4.0, 1.0, 4.0, 1.0])
  np.testing.assert_array_equal(context_match.boost(5, prints, 0.0), [1.0] * 4)
  np.testing.assert_array_equal(context_match.boost(None, prints, 3.0), [1.0] * 4)
