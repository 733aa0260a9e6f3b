"""The module map: entry points in prism_jax/main over libraries, and no import circles.

Every module's imports are read with `ast` (nothing is imported), deferred imports inside
functions included, since a circle through a deferred import is still a circle.
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "prism_jax"
MAIN = "prism_jax.main"


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
  """The prism_jax modules `name` imports (`from prism_jax import x` counts x when x is a
  module, else prism_jax itself)."""
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      for alias in node.names:
        found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
  return {m for m in found if m in known and m != name}


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  known = set(modules)
  return {name: _imports(name, path, known) for name, path in modules.items()}


def _is_main(name: str) -> bool:
  return name == MAIN or name.startswith(MAIN + ".")


def test_every_tool_has_an_entry_point():
  names = set(_modules())
  for tool in ("train", "evaluate", "generate", "index", "attribute", "lds", "compare", "plan",
               "control", "explore", "data"):
    assert f"{MAIN}.{tool}" in names, tool
  # The old spellings are gone: one way to run each tool.
  old = {f"prism_jax.{tool}" for tool in ("train", "evaluate", "generate", "index", "attribute",
                                           "lds", "compare")}
  old |= {f"prism_jax.{package}.__main__" for package in ("control", "explore", "data")}
  assert not old & names, old & names


def test_no_library_imports_an_entry_point():
  graph = _graph()
  upward = sorted(f"{m} -> {d}" for m, deps in graph.items() if not _is_main(m)
                  for d in deps if _is_main(d) and d != MAIN)
  assert not upward, upward


def test_no_entry_point_imports_another():
  graph = _graph()
  sideways = sorted(f"{m} -> {d}" for m, deps in graph.items() if _is_main(m)
                    for d in deps if _is_main(d) and d != MAIN)
  assert not sideways, sideways


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import circle among the modules, or None (depth-first search, three colours)."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(m):
    state[m] = 1
    path.append(m)
    for d in sorted(graph[m]):
      if state.get(d) == 1:
        return path[path.index(d):] + [d]
      if d not in state:
        found = visit(d)
        if found:
          return found
    path.pop()
    state[m] = 2
    return None

  for m in sorted(graph):
    if m not in state:
      found = visit(m)
      if found:
        return found
  return None


def test_no_import_cycles():
  # A module importing its own package (`from prism_jax.data import corpus` resolves the
  # package first) is how packages load, not a circle.
  graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in _graph().items()}
  cycle = _cycle(graph)
  assert cycle is None, " -> ".join(cycle)


def test_the_checker_finds_a_cycle():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set()}) is None
