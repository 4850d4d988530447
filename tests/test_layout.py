"""The package's import graph, read from the source with `ast`: no import circles (lazy,
function-level imports count, and so do imports only for type checking), and no private
name (`_x`) taken from another module; a private module only from inside its package."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"vesperjax": "vesperjax", "kernels": "vesperjax.kernels"}  # folder: module


def _modules() -> dict[str, str]:
  """module name -> file, for vesperjax/ and kernels/ (installed as vesperjax.kernels)."""
  out = {}
  for folder, prefix in PACKAGES.items():
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, folder)):
      dirnames[:] = [d for d in dirnames if d not in ("__pycache__", "static")]
      for name in filenames:
        if name.endswith(".py"):
          path = os.path.join(dirpath, name)
          rel = os.path.relpath(path, os.path.join(ROOT, folder))[:-3].split(os.sep)
          parts = [prefix] + [p for p in rel if p != "__init__"]
          out[".".join(parts)] = path
  return out


MODULES = _modules()


def _is_package(module: str) -> bool:
  return MODULES[module].endswith("__init__.py")


def _base(module: str, node: ast.ImportFrom) -> str:
  if not node.level:
    return node.module or ""
  package = module if _is_package(module) else module.rpartition(".")[0]
  for _ in range(node.level - 1):
    package = package.rpartition(".")[0]
  return package + ("." + node.module if node.module else "")


def _owner(name: str) -> str | None:
  """The module of ours that `name` (a dotted path) lives in, if any."""
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return name or None


def _imports(module: str):
  """(imported module, private name or None, line) for every import in `module`."""
  tree = ast.parse(open(MODULES[module], encoding="utf-8").read())
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        target = _owner(alias.name)
        if target:
          last = alias.name.rpartition(".")[2]
          yield target, (alias.name if last.startswith("_") else None), node.lineno
    elif isinstance(node, ast.ImportFrom):
      base = _base(module, node)
      for alias in node.names:
        full = f"{base}.{alias.name}"
        target = full if full in MODULES else _owner(base)
        if target:
          private = alias.name.startswith("_") and alias.name != "__future__"
          yield target, (full if private else None), node.lineno


def _graph():
  return {m: {t for t, _, _ in _imports(m) if t != m} for m in MODULES}


def _circles(graph) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan, iterative)."""
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
  for root in graph:
    if root in index:
      continue
    work = [(root, iter(sorted(graph[root])))]
    index[root] = low[root] = counter[0]
    counter[0] += 1
    stack.append(root)
    on.add(root)
    while work:
      node, children = work[-1]
      child = next(children, None)
      if child is not None:
        if child not in index:
          index[child] = low[child] = counter[0]
          counter[0] += 1
          stack.append(child)
          on.add(child)
          work.append((child, iter(sorted(graph[child]))))
        elif child in on:
          low[node] = min(low[node], index[child])
        continue
      work.pop()
      if work:
        low[work[-1][0]] = min(low[work[-1][0]], low[node])
      if low[node] == index[node]:
        component = []
        while True:
          top = stack.pop()
          on.discard(top)
          component.append(top)
          if top == node:
            break
        if len(component) > 1:
          out.append(sorted(component))
  return out


def test_the_scan_sees_the_package():
  assert {"vesperjax.optim.velvet", "vesperjax.kernels._velvet_update",
          "vesperjax.data.pipeline"} <= set(MODULES)
  assert "vesperjax.optim.velvet_math" in _graph()["vesperjax.kernels._velvet_update"]


def test_no_import_circles():
  assert _circles(_graph()) == []


def test_the_circle_finder_finds_one():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert _circles(graph) == [["a", "b", "c"]]


def test_no_private_name_crosses_modules():
  bad = []
  for module in MODULES:
    own_package = module if _is_package(module) else module.rpartition(".")[0]
    for target, private, line in _imports(module):
      if private is None:
        continue
      if private in MODULES:  # a private module: only its own package may import it
        if private.rpartition(".")[0] != own_package:
          bad.append(f"{MODULES[module]}:{line} imports {private}")
      else:
        bad.append(f"{MODULES[module]}:{line} imports {private}")
  assert bad == []


@pytest.mark.parametrize("source, private", [
    ("from vesperjax.cli import _one_line\n", "vesperjax.cli._one_line"),
    ("from vesperjax.kernels import _era\n", "vesperjax.kernels._era"),
])
def test_private_imports_are_seen(tmp_path, monkeypatch, source, private):
  path = tmp_path / "probe.py"
  path.write_text(source)
  monkeypatch.setitem(MODULES, "vesperjax.probe", str(path))
  assert [p for _, p, _ in _imports("vesperjax.probe")] == [private]
