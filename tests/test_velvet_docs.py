"""The code blocks of docs/velvet.md run, in order, in one namespace."""
import pathlib
import re

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "velvet.md"


def test_docs_examples_run(capsys):
  blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
  assert len(blocks) >= 4
  namespace = {}
  for i, code in enumerate(blocks):
    exec(compile(code, f"{DOC.name}[block {i}]", "exec"), namespace)  # pylint: disable=exec-used
  out = capsys.readouterr().out
  assert "entropy_scale" in out and "grad_norm" in out
