"""The items of the `vesperjax_continuation` lm-eval task (vesperjax_continuation.yaml):
which of three phrases continues a sentence of held-out English prose?

Each item is a passage from the validation split of the embedded `stdlib-docs` corpus
(docstrings of the standard library: held out of a run trained on `stdlib-docs`, and
present on every machine): `context` is its opening words, the choices are the next
four words, the same words in reverse order, and the next four words of the following
item's passage; `gold` is the index of the true continuation (item i puts it at
i % 3). Plain ASCII only, so a character is a byte (lm-eval's acc_norm divides by
characters) and a byte-level tokenizer splits context and continuation exactly.

`load` is the task's `custom_dataset` (lm-eval calls it; the file is found next to this
one whatever the working directory). `python tests/lm_eval_tasks/continuation.py`
rewrites continuation.jsonl from the running interpreter's standard library (another
Python version may pick other passages).
"""
import json
import os
import re

ITEMS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "continuation.jsonl")
COUNT = 20
CONTEXT_CHARS = 64  # context and choices fit the tests' 128-token byte-level model
CONTINUATION_WORDS = 4
_PLAIN = re.compile(r"[A-Za-z][A-Za-z0-9 ,;:'().-]*")  # no code, no markup


def load(**_):
  """{"test": Dataset} of the items (lm-eval passes the task's metadata: unused)."""
  import datasets
  with open(ITEMS, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return {"test": datasets.Dataset.from_list(rows)}


def passage(document: str) -> tuple[str, list[str]] | None:
  """(context, the next words) of a document's first plain paragraph long enough."""
  for paragraph in re.split(r"\n\s*\n", document):
    text = " ".join(paragraph.split())
    if not _PLAIN.fullmatch(text):
      continue
    words = text.split(" ")
    n = 0
    while n < len(words) and len(" ".join(words[:n + 1])) <= CONTEXT_CHARS:
      n += 1
    nxt = words[n:n + CONTINUATION_WORDS]
    if n >= 6 and len(nxt) == CONTINUATION_WORDS and nxt != nxt[::-1]:
      return " ".join(words[:n]), nxt
  return None


def make_items() -> list[dict]:
  from vesperjax.data.sources import open_source
  found = []
  for document in open_source("stdlib-docs", "val").documents():
    p = passage(document)
    if p and p[0] not in (c for c, _ in found):
      found.append(p)
    if len(found) == COUNT:
      break
  items = []
  for i, (context, words) in enumerate(found):
    true, other = " ".join(words), " ".join(found[(i + 1) % len(found)][1])
    wrong = [" ".join(words[::-1]), other]
    gold = i % 3
    items.append({"context": context, "choices": wrong[:gold] + [true] + wrong[gold:],
                  "gold": gold})
  return items


if __name__ == "__main__":
  with open(ITEMS, "w", encoding="utf-8") as f:
    for item in make_items():
      f.write(json.dumps(item) + "\n")
  print(f"wrote {ITEMS}")
