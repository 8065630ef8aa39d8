"""The package's shape: no import cycles (top-level or inside functions), nothing imports the
scoring CLI (``crossrec_jax.score``) but itself, and no module over ~400 lines."""

import ast
import pathlib
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "crossrec_jax"
MAX_LINES = 400


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


def test_modules_are_small():
  big = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
         if (n := len(p.read_text().splitlines())) > MAX_LINES}
  assert not big, f"modules over {MAX_LINES} lines (split them by concern): {big}"


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
