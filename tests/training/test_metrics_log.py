"""metrics.jsonl stays strict, line-parseable JSON after any crash: a torn last line is cut
before the next record is appended, a resume from an older checkpoint drops the rows
after it, non-finite values are null; one reader (`metrics_log`) serves the studio."""
import json
import math
import os
import shutil

import pytest

from vesperjax.studio import runs
from vesperjax.training import actions as act
from vesperjax.training import metrics_log
from vesperjax.training.trainer import Trainer
from tests.test_train import tiny_run


def strict_records(path) -> list[dict]:
  """Every line of the file as strict JSON (bare NaN / Infinity refused)."""
  def refuse(constant):
    raise ValueError(f"not JSON: {constant}")
  with open(path) as f:
    return [json.loads(line, parse_constant=refuse) for line in f]


def write(path, text: str) -> None:
  with open(path, "w") as f:
    f.write(text)


def row(step: int, loss: float = 1.0) -> str:
  return json.dumps({"step": step, "loss": loss}) + "\n"


def append_with_sink(workdir, resume_step: int, records: dict[int, dict]) -> None:
  sink = act.MetricsSink(str(workdir), max_steps=100, step=resume_step)
  for step, scalars in records.items():
    sink.write(step, scalars)
  sink.close()


def test_a_torn_last_line_is_cut_before_the_next_record(tmp_path, capsys):
  path = tmp_path / metrics_log.FILE
  write(path, row(10, 5.3) + row(20, 5.25) + '{"step": 30, "loss": 5.237')  # crashed here
  append_with_sink(tmp_path, 20, {30: {"loss": 5.2}})
  assert [r["step"] for r in strict_records(path)] == [10, 20, 30]
  assert strict_records(path)[-1] == {"step": 30, "loss": 5.2}
  assert "cut a torn last line" in capsys.readouterr().err


def test_a_resume_from_an_older_step_keeps_steps_unique_and_increasing(tmp_path, capsys):
  path = tmp_path / metrics_log.FILE
  write(path, "".join(row(s) for s in range(1, 9)) + "garbled {\n")
  append_with_sink(tmp_path, 4, {s: {"loss": 2.0} for s in range(5, 9)})
  steps = [r["step"] for r in strict_records(path)]
  assert steps == list(range(1, 9))
  assert [r["loss"] for r in strict_records(path)] == [1.0] * 4 + [2.0] * 4
  err = capsys.readouterr().err
  assert "dropped 4 row(s) logged after step 4" in err and "1 malformed line" in err
  assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # the rewrite's temp file


def test_a_clean_file_is_left_as_it_is(tmp_path):
  path = tmp_path / metrics_log.FILE
  write(path, row(1) + row(2))
  before = os.stat(path).st_ino
  assert metrics_log.prepare_for_append(str(path), 2) == []
  assert os.stat(path).st_ino == before and path.read_text() == row(1) + row(2)
  assert metrics_log.prepare_for_append(str(tmp_path / "missing.jsonl"), 0) == []


def test_non_finite_values_are_written_as_null_and_read_back_as_none(tmp_path):
  append_with_sink(tmp_path, 0, {1: {"loss": float("nan"), "grad_norm": float("inf"),
                                     "learning_rate": 1e-3}})
  path = tmp_path / metrics_log.FILE
  assert '"loss": null' in path.read_text() and "NaN" not in path.read_text()
  assert strict_records(path) == [{"step": 1, "loss": None, "grad_norm": None,
                                   "learning_rate": 1e-3}]
  assert metrics_log.read_records(str(path)) == strict_records(path)


def test_the_reader_skips_a_torn_line_and_reads_old_nan_as_none(tmp_path):
  path = tmp_path / metrics_log.FILE
  write(path, '{"step": 1, "loss": NaN, "x": 1e999}\n[1, 2]\n{"step": true}\n'
        + row(2) + '{"step": 3, "lo')
  expected = [{"step": 1, "loss": None, "x": None}, {"step": 2, "loss": 1.0}]
  assert metrics_log.read_records(str(path)) == expected
  records, end = runs.read_metrics(str(tmp_path))  # the studio reads through it too
  assert records == expected and end == path.read_text().rindex("\n") + 1
  assert json.dumps(records, allow_nan=False)  # what the studio serves is JSON


def test_a_crashed_run_resumed_from_an_older_checkpoint_logs_each_step_once(
    corpus, tmp_path, capsys):
  run = tiny_run(corpus, max_steps=8, save_every=4, eval_every=100)
  first = Trainer(run, str(tmp_path))
  first.train()
  first.close()
  # the crash: after step 8 was logged and while its record was being written, before
  # its checkpoint was saved
  shutil.rmtree(tmp_path / "checkpoints" / "8")
  path = tmp_path / metrics_log.FILE
  with open(path, "a") as f:
    f.write('{"step": 8, "loss": 3.1')
  second = Trainer(run, str(tmp_path))
  assert int(second.state.step) == 4
  second.train()
  second.close()
  records = strict_records(path)
  train_steps = [r["step"] for r in records if "loss" in r]
  assert train_steps == list(range(1, 9))
  assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
  err = capsys.readouterr().err
  assert "cut a torn last line" in err and "logged after step 4" in err


@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_encode_keeps_the_key_of_a_non_finite_value(value):
  assert json.loads(metrics_log.encode(3, {"a": value, "b": 2})) == {"step": 3, "a": None,
                                                                     "b": 2}


def test_a_studio_reader_following_the_file_sees_a_resume_rewrite_it(tmp_path, capsys):
  path = str(tmp_path / metrics_log.FILE)
  with open(path, "w") as f:
    f.writelines(metrics_log.encode(s, {"loss": 5.0 - s / 10}) for s in (10, 20, 30))
  records, offset = runs.read_metrics(str(tmp_path))
  replaced, followed = runs.metrics_replaced(str(tmp_path), None, offset)
  assert [r["step"] for r in records] == [10, 20, 30] and not replaced
  with open(path, "a") as f:  # the run appends: the same file, followed on
    f.write(metrics_log.encode(40, {"loss": 1.0}))
  replaced, followed = runs.metrics_replaced(str(tmp_path), followed, offset)
  assert not replaced and [r["step"] for r in runs.read_metrics(str(tmp_path), offset)[0]] == [40]
  metrics_log.prepare_for_append(path, 20)  # a resume from step 20 rewrites the file
  replaced, _ = runs.metrics_replaced(str(tmp_path), followed, offset)
  assert replaced
  assert [r["step"] for r in runs.read_metrics(str(tmp_path))[0]] == [10, 20]
