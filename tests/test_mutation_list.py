"""The mutation check's list stays in step with the code: every planted bug still applies
and names tests that exist (`python -m tests.mutation_check` then runs them; it is too slow
for the suite, so this keeps it from drifting unnoticed between its runs)."""

import os
import re

import pytest

from tests import mutation_check


@pytest.mark.parametrize("mutation", mutation_check.MUTATIONS, ids=lambda m: m.name)
def test_every_mutation_applies_and_names_real_tests(mutation):
  with open(os.path.join(mutation_check.REPO, mutation.file), encoding="utf-8") as f:
    assert f.read().count(mutation.original) == 1, mutation.original
  assert mutation.original != mutation.replacement and mutation.tests
  for node in mutation.tests:
    path, _, name = node.partition("::")
    with open(os.path.join(mutation_check.REPO, path), encoding="utf-8") as f:
      source = f.read()
    if name:  # a test id, maybe parametrized: test_x[param]
      function = name.split("[")[0]
      assert re.search(rf"^def {re.escape(function)}\(", source, re.M), node


def test_mutation_names_are_unique():
  names = [m.name for m in mutation_check.MUTATIONS]
  assert len(names) == len(set(names))
