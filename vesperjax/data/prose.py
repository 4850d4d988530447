"""`stdlib-docs`: an English prose corpus from the running interpreter's standard library,
present on every machine (nothing is downloaded): the docstrings of each module (module,
class and function docstrings of one .py file, joined by blank lines: one document) and
the language reference's topics of `pydoc_data/topics.py` (one document each).

It is prose about code rather than code: a corpus of another kind than `stdlib` for the
optimizer study (docs/benchmarks.md). Docstrings are read with `ast`, never imported.
"""
from __future__ import annotations

import ast
from typing import Iterator

_TOPICS = "pydoc_data/topics.py"
_DEFS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def documents(path: str, rel: str) -> Iterator[tuple[str, str]]:
  """(split key, text) of one stdlib file's prose; a file that does not parse gives
  nothing (not user data: skipped, as `stdlib` skips undecodable files)."""
  try:
    with open(path, encoding="utf-8") as fh:
      tree = ast.parse(fh.read())
  except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
    return
  if rel == _TOPICS:
    yield from _topics(tree, rel)
    return
  docs = [ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, _DEFS)]
  text = "\n\n".join(d.strip() for d in docs if d and d.strip())
  if text:
    yield rel, text


def _topics(tree: ast.Module, rel: str) -> Iterator[tuple[str, str]]:
  for node in tree.body:
    if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
      for key, value in zip(node.value.keys, node.value.values):
        if (isinstance(key, ast.Constant) and isinstance(value, ast.Constant)
            and isinstance(value.value, str) and value.value.strip()):
          yield f"{rel}#{key.value}", value.value.strip()
