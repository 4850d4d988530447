"""The docs point at what exists, and the README's figures equal their reports: every
relative link of README.md, docs/*.md and kernels/README.md names a file (and, for a
markdown file, a heading) of the repository; each row of the README's Figures table is
recomputed from the report it links to."""
import glob
import json
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "kernels/README.md", "CHANGELOG.md"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, punctuation but `_` dropped, spaces to
  dashes (the `_` of a code span stays: `init_from` gives init_from)."""
  text = re.sub(r"[`*]", "", heading.strip().lower())
  return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: str) -> set[str]:
  text = open(path, encoding="utf-8").read()
  text = re.sub(r"```.*?```", "", text, flags=re.S)  # a '#' in a code block is no heading
  return {_slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def _links():
  for doc in DOCS:
    text = open(os.path.join(ROOT, doc), encoding="utf-8").read()
    for target in LINK.findall(text):
      if not re.match(r"[a-z]+:", target):  # http:, https:, mailto:
        yield doc, target


@pytest.mark.parametrize("doc,target", list(_links()))
def test_a_relative_link_names_a_file_and_heading_that_exist(doc, target):
  path, _, anchor = target.partition("#")
  where = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), path)) if path \
      else os.path.join(ROOT, doc)
  assert os.path.exists(where), f"{doc} links to {target}: no such file"
  if anchor and where.endswith(".md"):
    assert anchor in _anchors(where), f"{doc} links to {target}: no such heading"


def _figures() -> dict[str, tuple[str, str]]:
  """README's Figures table: what -> (figure, report path)."""
  text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  table = text.split("## Figures", 1)[1].split("\n## ", 1)[0]
  rows = {}
  for line in table.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    found = LINK.search(cells[-1]) if len(cells) == 3 else None
    if found:
      rows[cells[0]] = (cells[1], found.group(1))
  return rows


def _row(start: str) -> tuple[str, dict | str]:
  [(figure, report)] = [v for k, v in _figures().items() if k.startswith(start)]
  return figure, os.path.join(ROOT, report)


def test_the_readme_train_step_figures_equal_the_side_by_side_report():
  for start, model in (("CPU train step, tiny (dense)", "dense"),
                       ("CPU train step, tiny-moe", "moe")):
    figure, report = _row(start)
    ratio = json.load(open(report))["summary"][model]["ratio"]
    assert figure == f"{ratio:.2f}x its speed", (start, figure, ratio)


def test_the_readme_decode_figure_equals_its_report():
  figure, report = _row("decode, tiny")
  s = json.load(open(report))["summary"]
  assert figure == (f"{s['loop_over_original']:.1f}x (compiled loop), "
                    f"{s['streaming_over_original']:.1f}x (streaming)")


def test_the_readme_velvet_figure_equals_the_long_benchmark():
  from vesperjax.bench.optimizers import read_report, summarize
  figure, report = _row("Velvet (original rules) vs tuned AdamW")
  summary = summarize(read_report(report))
  assert summary["best"]["velvet"]["seeds"] >= 3 and summary["best"]["adamw"]["seeds"] >= 3
  assert figure == f"{summary['vs_adamw_pct']['velvet']:+.1f}% (worse)"


@pytest.mark.parametrize("start,arm,word", [
    ("Velvet (corrected rules) vs tuned AdamW", "velvet-corrected", "worse"),
    ("Muon (optax.contrib) vs tuned AdamW", "muon", "better")])
def test_the_readme_study_figures_equal_the_study_report(start, arm, word):
  from vesperjax.bench.optimizers import read_report, summarize
  figure, report = _row(start)
  summary = summarize(read_report(report))
  assert summary["best"][arm]["seeds"] >= 3 and summary["best"]["adamw"]["seeds"] >= 3
  assert figure == f"{summary['vs_adamw_pct'][arm]:+.1f}% ({word})"


def test_the_figures_table_is_read():
  assert len(_figures()) == 6
