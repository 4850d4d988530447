"""Fault injection: damaged checkpoints are set aside and the run falls back to the newest
intact one, resuming to the same losses as an uninterrupted run."""
import glob
import os

import pytest

from tests.conftest import mounted_tmpfs
from tests.test_train import cli, losses, overrides, tiny_run
from vesperjax.checkpoint import CheckpointError
from vesperjax.train import train
from vesperjax.training.trainer import Trainer


def _truncate_largest_array(step_dir):
  files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
  with open(max(files, key=os.path.getsize), "r+b") as f:
    f.truncate(100)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
  """An uninterrupted 8-step run, and a 6-step one (checkpoints 2, 4, 6) to damage."""
  full = tmp_path_factory.mktemp("full")
  assert train(tiny_run(corpus, max_steps=8, save_every=2, keep_checkpoints=5), str(full)) == 0
  part = tmp_path_factory.mktemp("part")  # the same run, stopped (and saved) at step 6
  trainer = Trainer(tiny_run(corpus, max_steps=8, save_every=2, keep_checkpoints=5), str(part))
  trainer.train(stop_at=6)
  trainer.close()
  return losses(full), part


@pytest.mark.parametrize("damage", ["truncated array", "garbled json"])
def test_damaged_newest_checkpoint_falls_back(reference, corpus, tmp_path, damage,
                                              monkeypatch):
  want, part = reference
  work = tmp_path / "run"
  os.system(f"cp -r {part} {work}")
  step6 = work / "checkpoints" / "6"
  if damage == "truncated array":
    _truncate_largest_array(step6)
  else:
    (step6 / "state" / "_METADATA").write_text("{garbage")
  logged = []  # every status line, those of the constructor (where the fallback is) too
  monkeypatch.setattr(Trainer, "_log_line", lambda self, text: logged.append(text))
  trainer = Trainer(tiny_run(corpus, max_steps=8, save_every=2, keep_checkpoints=5),
                    str(work))
  assert int(trainer.state.step) == 4
  # one line for the damaged checkpoint, naming its step (and the file, for JSON) and
  # where it was moved; then the resume
  damaged = [line for line in logged if "unreadable" in line]
  assert len(damaged) == 1, logged
  assert "\n" not in damaged[0]
  assert damaged[0].startswith(f"checkpoint 6 in {work / 'checkpoints'} is unreadable ("), logged
  assert f"; moved to {work / 'corrupt' / 'checkpoints-6-'}" in damaged[0], logged
  if damage == "garbled json":
    assert f"{step6 / 'state' / '_METADATA'}: not valid JSON" in damaged[0], logged
  assert logged.index(damaged[0]) < logged.index("resumed from step 4"), logged
  trainer.train()
  trainer.close()
  got = losses(work)
  assert all(got[s] == want[s] for s in (5, 6, 7, 8)), (got, want)  # exact resume from 4
  aside = os.listdir(work / "corrupt")
  assert len(aside) == 1 and aside[0].startswith("checkpoints-6-")  # kept, not deleted


def test_nothing_readable_is_one_error_and_moves_nothing(reference, corpus, tmp_path):
  _, part = reference
  work = tmp_path / "run"
  os.system(f"cp -r {part} {work}")
  for step in glob.glob(str(work / "checkpoints" / "*")) + glob.glob(str(work / "best" / "*")):
    if os.path.basename(step).isdigit():
      _truncate_largest_array(step)
  r = cli(*overrides(corpus, work), "--config.train.max_steps=8",
          "--config.train.save_every=2")
  assert r.returncode == 2, r.stderr
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("error: no readable checkpoint: step 6 (the newest) failed")
  assert "Traceback" not in r.stderr and not os.path.exists(work / "corrupt")
  with pytest.raises(CheckpointError):
    Trainer(tiny_run(corpus, max_steps=8), str(work))


def test_garbled_best_metrics_do_not_block_resume(reference, corpus, tmp_path):
  _, part = reference
  work = tmp_path / "run"
  os.system(f"cp -r {part} {work}")
  for path in glob.glob(str(work / "best" / "*" / "metrics" / "metrics")):
    with open(path, "w") as f:
      f.write("{garbage")
  trainer = Trainer(tiny_run(corpus, max_steps=8), str(work))
  assert int(trainer.state.step) == 6 and trainer.built.ckpt.best_loss == float("inf")
  trainer.close()


def test_error_in_the_loop_saves_the_last_state_first(corpus, tmp_path):
  """The validation cache vanishes before the first eval: the steps trained so far are
  checkpointed before the error is reported."""
  import shutil
  trainer = Trainer(tiny_run(corpus, max_steps=8, eval_every=3, save_every=100),
                    str(tmp_path))
  shutil.rmtree(trainer.built.data.val_cache.path)
  with pytest.raises(OSError):
    trainer.train()
  assert trainer.built.ckpt.latest_step() == 3
  trainer.close()
  resumed = Trainer(tiny_run(corpus, max_steps=8, eval_every=100), str(tmp_path))
  assert int(resumed.state.step) == 3
  resumed.close()


@pytest.fixture
def small_disk(tmp_path):
  """A 600 KB tmpfs: one checkpoint of the tiny run fits, the next does not."""
  yield from mounted_tmpfs(tmp_path / "disk", "600k")


def test_disk_full_during_save_is_one_line_and_keeps_the_last_checkpoint(
    corpus, tmp_path, small_disk):
  import subprocess
  work = small_disk / "run"
  run = ["--config.train.max_steps=8", "--config.train.save_every=2",
         "--config.train.log_every=1", "--config.train.eval_every=100",
         f"--config.data.cache_dir={tmp_path / 'cache'}"]
  full = cli(*overrides(corpus, small_disk / "run"), *run)
  assert full.returncode == 2, full.stderr
  assert "Traceback" not in full.stderr, full.stderr
  last = full.stderr.strip().splitlines()[-1]
  assert last.startswith("error: checkpoint ") and "no space left on device" in last, last
  assert "the latest checkpoint is step 2; its partial files were removed" in last, last
  left = os.listdir(work / "checkpoints")
  assert left == ["2"], left  # no *.orbax-checkpoint-tmp debris

  subprocess.run(["mount", "-o", "remount,size=50m", str(small_disk)], check=True)
  resumed = cli(*overrides(corpus, work), *run)
  assert resumed.returncode == 0, resumed.stderr
  assert "resumed from step 2" in resumed.stderr
  reference = cli(*overrides(corpus, tmp_path / "reference"), *run)
  assert reference.returncode == 0, reference.stderr
  want, got = losses(tmp_path / "reference"), losses(work)
  assert all(got[s] == want[s] for s in range(3, 9)), (got, want)
