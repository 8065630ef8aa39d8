"""The package's shape: no import cycles (top-level or inside functions); nothing imports the
scoring CLI (``crossrec_jax.score``) but itself; only command-line entry points import the CLI
module (``crossrec_jax.cli``: error types live in ``crossrec_jax.errors``, so no layer needs to
import upward); no compatibility re-exports (a module that only re-exports names, or an
``import ...  # noqa: F401`` line outside a package's ``__init__``).

Modules are split by concern, not by line count: a tight line cap made files be cut at an
arbitrary line and glued back with re-exports. What is left is a generous sanity cap
(``MAX_LINES``) that only a module doing several jobs at once reaches.
"""

import ast
import pathlib
import re
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "crossrec_jax"
MAX_LINES = 700
CLI = "crossrec_jax.cli"
_F401 = re.compile(r"#\s*noqa\s*:[^#]*\bF401\b")


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, modules) -> str | None:
  """The package module ``name`` refers to (``a.b.func`` -> ``a.b``), or None if external."""
  while name and name not in modules:
    name = name.rpartition(".")[0]
  return name or None


def import_graph() -> dict[str, set[str]]:
  """module -> the package modules it imports, from every import statement (any depth)."""
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative import
          anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
          base = ".".join(anchor + ([base] if base else []))
        # ``from pkg import mod`` imports the module ``pkg.mod``; ``from mod import name`` mod.
        names = [f"{base}.{a.name}" for a in node.names] + [base]
        names = [n for n in names if n in modules] or [base]
      else:
        continue
      for n in names:
        target = _resolve(n, modules)
        if target and target != name:
          targets.add(target)
    graph[name] = targets
  return graph


def _cycles(graph) -> list[list[str]]:
  """Every strongly connected component with more than one module (Tarjan)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def _ancestors(name: str) -> set[str]:
  """A module's enclosing packages: importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__``,
  which is no cycle of the code's own making, so those edges are left out."""
  parts = name.split(".")
  return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_no_import_cycles():
  graph = {m: {t for t in ts if t not in _ancestors(m)} for m, ts in import_graph().items()}
  cycles = _cycles(graph)
  assert not cycles, "import cycles between modules (break them; see crossrec_jax/experiment.py):\n" + \
      "\n".join(" <-> ".join(c) for c in cycles)


def test_cycle_finder_finds_a_cycle():
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert _cycles({"a": {"b"}, "b": set()}) == []


def test_nothing_imports_the_scoring_cli():
  importers = sorted(m for m, targets in import_graph().items()
                     if "crossrec_jax.score" in targets and m != "crossrec_jax.score")
  assert not importers, (f"{importers} import crossrec_jax.score (the scoring CLI); import what "
                         "they need from crossrec_jax.rundir / crossrec_jax.serving.scorer instead")


def _is_entry_point(tree: ast.Module) -> bool:
  """A command line: an ``if __name__ == "__main__":`` block or a ``cli_main`` function."""
  for node in tree.body:
    if isinstance(node, ast.FunctionDef) and node.name == "cli_main":
      return True
    if (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"
        and any(isinstance(c, ast.Constant) and c.value == "__main__"
                for c in node.test.comparators)):
      return True
  return False


def cli_importers() -> list[str]:
  """Modules that import the CLI module but are no command-line entry point."""
  modules = _modules()
  return sorted(m for m, targets in import_graph().items()
                if CLI in targets and m != CLI
                and not _is_entry_point(ast.parse(modules[m].read_text())))


def _is_docstring_or_all(node: ast.stmt) -> bool:
  if isinstance(node, ast.Expr):
    return isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
  targets = node.targets if isinstance(node, ast.Assign) else \
      [node.target] if isinstance(node, ast.AnnAssign) else []
  return any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets)


def reexport_modules() -> list[str]:
  """Non-``__init__`` modules whose body is only imports (besides docstring / ``__all__``)."""
  found = []
  for name, path in _modules().items():
    if path.name == "__init__.py":
      continue
    body = [n for n in ast.parse(path.read_text()).body if not _is_docstring_or_all(n)]
    if body and all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in body):
      found.append(name)
  return found


def reexport_lines() -> list[str]:
  """``path:line`` of every import marked ``# noqa: F401`` (imported but unused here: kept for
  others to import from this module) outside a package's ``__init__``."""
  found = []
  for path in sorted(PACKAGE.rglob("*.py")):
    if path.name == "__init__.py":
      continue
    text = path.read_text()
    lines = text.splitlines()
    for node in ast.walk(ast.parse(text)):
      if isinstance(node, (ast.Import, ast.ImportFrom)) and any(
          _F401.search(lines[i - 1]) for i in range(node.lineno, node.end_lineno + 1)):
        found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
  return found


def test_only_entry_points_import_the_cli():
  importers = cli_importers()
  assert not importers, (f"{importers} import {CLI} (the command lines' flag parsing and exit "
                         "codes) but are no entry point: import error types from "
                         "crossrec_jax.errors, or move the code that needs the CLI under "
                         "`if __name__ == \"__main__\":` / a cli_main function")


def test_no_module_only_reexports():
  found = reexport_modules()
  assert not found, (f"{found} only re-export names: import them from the module that defines "
                     "them and delete these modules")


def test_no_compatibility_reexport_lines():
  found = reexport_lines()
  assert not found, (f"compatibility re-exports (`# noqa: F401` imports) at {found}: import the "
                     "names from the module that defines them where they are used, and delete "
                     "these imports")


def test_modules_are_not_huge():
  big = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
         if (n := len(p.read_text().splitlines())) > MAX_LINES}
  assert not big, (f"modules over {MAX_LINES} lines: {big}; a module this long does several "
                   "jobs: split it by concern (never at a line count)")


@pytest.mark.parametrize("source,expected", [
    ("from crossrec_jax import score", {"crossrec_jax.score"}),
    ("def f():\n  from crossrec_jax.score import ScoringError", {"crossrec_jax.score"}),
    ("import crossrec_jax.data.records as r", {"crossrec_jax.data.records"}),
    ("from .data import records", {"crossrec_jax.data.records"}),
])
def test_graph_sees_every_import_form(tmp_path, monkeypatch, source, expected):
  pkg = tmp_path / "crossrec_jax"
  (pkg / "data").mkdir(parents=True)
  for f in ("__init__.py", "score.py", "probe.py", "data/__init__.py", "data/records.py"):
    (pkg / f).write_text("")
  (pkg / "probe.py").write_text(source)
  monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
  # ``from pkg import mod`` also runs pkg/__init__.py: the package is an edge as well.
  assert import_graph()["crossrec_jax.probe"] - {"crossrec_jax", "crossrec_jax.data"} == expected


def _synthetic_package(tmp_path, monkeypatch, files: dict[str, str]) -> None:
  """A throwaway ``crossrec_jax`` package of ``files`` (path -> source) that the checks read."""
  pkg = tmp_path / "crossrec_jax"
  for f, source in {"__init__.py": "", "cli.py": "", "errors.py": "", **files}.items():
    (pkg / f).parent.mkdir(parents=True, exist_ok=True)
    (pkg / f).write_text(source)
  monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)


@pytest.mark.parametrize("source,flagged", [
    ("from crossrec_jax import cli", True),
    ("def f():\n  from crossrec_jax.cli import run_absl", True),
    ("from ..cli import run_absl", True),
    ("from crossrec_jax import errors", False),
    ("from crossrec_jax import cli\ndef cli_main():\n  return cli.run_absl(None, None, None)", False),
    ("import sys\nif __name__ == '__main__':\n  from crossrec_jax import cli\n  sys.exit(0)", False),
])
def test_cli_check_fires_on_an_upward_import(tmp_path, monkeypatch, source, flagged):
  _synthetic_package(tmp_path, monkeypatch, {"data/__init__.py": "", "data/lower.py": source})
  assert cli_importers() == (["crossrec_jax.data.lower"] if flagged else [])


@pytest.mark.parametrize("source,flagged", [
    ('"""Old home of f."""\nfrom crossrec_jax.errors import ConfigError\n__all__ = ["ConfigError"]', True),
    ("from __future__ import annotations\nimport crossrec_jax.errors\nfrom crossrec_jax import cli", True),
    ('"""Only a docstring."""', False),
    ("from crossrec_jax.errors import ConfigError\nBAD = ConfigError", False),
    ("import sys\ndef f():\n  return sys.argv", False),
])
def test_reexport_module_check_fires(tmp_path, monkeypatch, source, flagged):
  _synthetic_package(tmp_path, monkeypatch, {"shim.py": source,
                                             "sub/__init__.py": "from crossrec_jax import errors"})
  assert reexport_modules() == (["crossrec_jax.shim"] if flagged else [])  # __init__: allowed


@pytest.mark.parametrize("source,line", [
    ("import os\nfrom crossrec_jax.errors import ConfigError  # noqa: F401\nX = os.sep", 2),
    ("import os\nfrom crossrec_jax.errors import (ConfigError,  # noqa: F401 (public here)\n"
     "                                UsageError)\nX = os.sep", 2),
    ("from crossrec_jax.errors import (ConfigError,\n    UsageError)  # noqa:E501,F401\nX = 1", 1),
    ("def f():\n  import crossrec_jax.cli  # noqa: F401\n  return 1", 2),
    ("from crossrec_jax.errors import ConfigError  # noqa: E501\nX = ConfigError", None),
    ("X = 1  # noqa: F401", None),
])
def test_reexport_line_check_fires(tmp_path, monkeypatch, source, line):
  _synthetic_package(tmp_path, monkeypatch, {"mod.py": source,
                                             "__init__.py": "from crossrec_jax.errors import ConfigError  # noqa: F401"})
  assert reexport_lines() == ([f"crossrec_jax/mod.py:{line}"] if line else [])


def test_line_cap_fires(tmp_path, monkeypatch):
  _synthetic_package(tmp_path, monkeypatch, {"big.py": "X = 1\n" * (MAX_LINES + 1),
                                             "ok.py": "X = 1\n" * MAX_LINES})
  with pytest.raises(AssertionError, match=r"big\.py"):
    test_modules_are_not_huge()
