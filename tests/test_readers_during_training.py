"""export and generate on a run whose trainer rotates its checkpoints (keep_checkpoints):
the newest checkpoint complete at the start is read, and when the trainer removes it
while it is being read, the then-newest once more; the step read is named on stderr and
anything else is one `error:` line.

The trainer is simulated deterministically: orbax's restore is wrapped so that, just
before a read, the "trainer" saves the next step (a copy of a checkpoint) and deletes
the one about to be read."""
import json
import os
import shutil

import orbax.checkpoint as ocp
import pytest

from vesperjax import export as ex
from vesperjax import generate as gen
from tests.test_export import save_run


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  return save_run(tmp_path_factory.mktemp("saved"), lora_rank=0)[0]


def run_with_steps(saved, tmp_path, steps) -> str:
  """A copy of the saved run whose checkpoints are `steps` (copies of its step 2)."""
  workdir = str(tmp_path / "run")
  shutil.copytree(saved, workdir)
  ckpts = os.path.join(workdir, "checkpoints")
  for step in steps:
    if step != 2:
      shutil.copytree(os.path.join(ckpts, "2"), os.path.join(ckpts, str(step)))
  if 2 not in steps:
    shutil.rmtree(os.path.join(ckpts, "2"))
  return workdir


def rotate_before_reads(monkeypatch, workdir, times=1) -> list[int]:
  """For the next `times` checkpoint reads: save the next step, then delete the one
  being read, as a trainer with keep_checkpoints does. Returns the steps deleted."""
  ckpts = os.path.join(workdir, "checkpoints")
  restore, deleted = ocp.CheckpointManager.restore, []

  def rotating(self, step, *args, **kwargs):
    if len(deleted) < times and os.path.dirname(str(self.directory)) == workdir:
      newest = max(int(s) for s in os.listdir(ckpts) if s.isdigit())
      shutil.copytree(os.path.join(ckpts, str(step)), os.path.join(ckpts, str(newest + 2)))
      shutil.rmtree(os.path.join(ckpts, str(step)))
      deleted.append(step)
    return restore(self, step, *args, **kwargs)
  monkeypatch.setattr(ocp.CheckpointManager, "restore", rotating)
  return deleted


def test_export_reads_the_then_newest_when_its_checkpoint_is_rotated_out(
    saved, tmp_path, monkeypatch, capsys):
  workdir = run_with_steps(saved, tmp_path, [2, 4])
  deleted = rotate_before_reads(monkeypatch, workdir)
  out = tmp_path / "out"
  assert ex.main(["export", f"--workdir={workdir}", f"--out={out}"]) == 0
  err = capsys.readouterr().err
  assert deleted == [4]
  assert "checkpoint 4 of" in err and "rotated out while being read" in err, err
  assert "reading 6 instead" in err and "exported step 6 of" in err, err
  assert json.load(open(out / "config.json"))["source"] == {"step": 6, "checkpoint": "latest"}
  assert "error" not in err and "Traceback" not in err


def test_generate_reads_the_then_newest_and_names_it(saved, tmp_path, monkeypatch, capsys):
  workdir = run_with_steps(saved, tmp_path, [2, 4])
  rotate_before_reads(monkeypatch, workdir)
  args = ["generate", f"--workdir={workdir}", "--prompt=def ", "--max-tokens=2",
          "--temperature=0"]
  assert gen.main(args) == 0
  captured = capsys.readouterr()
  assert captured.out.startswith("def ")
  assert "reading 6 instead" in captured.err
  assert f"read checkpoint 6 of {workdir} (latest)" in captured.err, captured.err


def test_generate_names_the_step_it_read(saved, tmp_path, capsys):
  workdir = run_with_steps(saved, tmp_path, [2, 4])
  assert gen.main(["generate", f"--workdir={workdir}", "--prompt=x", "--max-tokens=1",
                   "--step=2"]) == 0
  assert f"read checkpoint 2 of {workdir} (asked for)" in capsys.readouterr().err


def one_error_line(err: str) -> str:
  errors = [line for line in err.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
  assert "Traceback" not in err
  return errors[0]


def test_a_second_rotation_during_the_retry_is_one_error_line(
    saved, tmp_path, monkeypatch, capsys):
  workdir = run_with_steps(saved, tmp_path, [2, 4])
  deleted = rotate_before_reads(monkeypatch, workdir, times=2)
  assert ex.main(["export", f"--workdir={workdir}", f"--out={tmp_path / 'out'}"]) == 2
  line = one_error_line(capsys.readouterr().err)
  assert deleted == [4, 6]
  assert "cannot read checkpoint 6" in line and "after 4 was rotated out" in line, line
  assert not os.path.exists(tmp_path / "out")


def test_an_asked_for_step_removed_while_read_is_one_error_line(
    saved, tmp_path, monkeypatch, capsys):
  workdir = run_with_steps(saved, tmp_path, [2, 4])
  rotate_before_reads(monkeypatch, workdir)
  assert ex.main(["export", f"--workdir={workdir}", "--step=4",
                  f"--out={tmp_path / 'out'}"]) == 2
  line = one_error_line(capsys.readouterr().err)
  assert "checkpoint 4 of" in line and "removed while being read" in line, line
  assert "have [2, 6]" in line


def test_a_damaged_newest_checkpoint_is_not_taken_for_a_rotation(saved, tmp_path, capsys):
  workdir = run_with_steps(saved, tmp_path, [2, 4])
  data = os.path.join(workdir, "checkpoints", "4", "state", "ocdbt.process_0", "d")
  for name in os.listdir(data):  # every array's bytes gone, the metadata intact
    open(os.path.join(data, name), "wb").close()
  assert ex.main(["export", f"--workdir={workdir}", f"--out={tmp_path / 'out'}"]) == 2
  line = one_error_line(capsys.readouterr().err)
  assert line.startswith(f"error: cannot read checkpoint 4 of {workdir}: "), line
  assert "rotated out" not in line
