"""Divergence: the step guard covers the new state, and a diverging run stops non-zero
keeping its last good checkpoint."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_train import tiny_run
from vesperjax.training.divergence import DivergenceGuard
from vesperjax.run_config import RunConfig
from vesperjax.training.train_step import all_finite
from vesperjax.training.trainer import RunError, Trainer


def test_guard_rules():
  guard = DivergenceGuard(max_skipped_steps=3, loss_spike_factor=3.0)
  for loss in (9.0, 7.0, 6.0, 5.5):  # falling losses never trip it
    guard.record(jnp.asarray(True))
    assert guard.check(1, loss) is None
  for _ in range(2):
    guard.record(jnp.asarray(False))
  assert guard.check(2, float("nan")) is None and guard.streak == 2
  guard.record(jnp.asarray(True))  # a finite step ends the streak
  assert guard.check(3, 5.4) is None and guard.streak == 0
  for _ in range(3):
    guard.record(jnp.asarray(False))
  assert "3 consecutive steps were not finite" in guard.check(4, float("inf"))
  spike = DivergenceGuard(0, 3.0)
  for loss in (6.0, 5.0, 4.0):
    assert spike.check(1, loss) is None
  assert "over 3x the median 5" in spike.check(2, 15.5)
  assert DivergenceGuard(0, 0).check(1, 1e9) is None  # both rules off


def test_step_guard_covers_the_new_state(corpus, tmp_path):
  """lr=inf (refused by the CLI, forced here): loss and gradient are finite, the update
  is not; the step is skipped and the state is untouched."""
  cd = tiny_run(corpus, max_steps=4)
  cd.optim.update(dict(lr=float("inf"), warmup_steps=0))
  with pytest.raises(ValueError, match="config.optim.lr: must be finite"):
    Trainer(cd, str(tmp_path))  # a ConfigDict is validated at the door, as by the CLI
  cd.optim.lr = 1e-3
  run = RunConfig.from_config_dict(cd).replace(optim=dict(lr=float("inf")))
  trainer = Trainer(run, str(tmp_path))  # a RunConfig is taken as it is
  before = jax.tree.map(np.asarray, (trainer.state.params, trainer.state.opt_state))
  with jax.set_mesh(trainer.built.model.mesh):
    batch = trainer._next_batch()  # pylint: disable=protected-access
    state, metrics = trainer.built.model.steps.train_step(trainer.state, batch)
  assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  assert not bool(metrics["finite"]) and int(state.skipped) == 1
  after = jax.tree.map(np.asarray, (state.params, state.opt_state))
  jax.tree.map(np.testing.assert_array_equal, before, after)
  trainer.state = state
  trainer.close()


def test_diverging_run_stops_and_keeps_its_last_good_checkpoint(corpus, tmp_path):
  """Steps 1-4 train normally and are checkpointed; the run resumed with lr=1e6 diverges
  and stops non-zero, and checkpoint 4 is still there, the newest, whole and unchanged."""
  good = tiny_run(corpus, max_steps=30, save_every=2, eval_every=100, log_every=1)
  first = Trainer(good, str(tmp_path))
  first.train(stop_at=4)
  first.close()
  assert first.built.ckpt.latest_step() == 4
  kept = jax.tree.map(np.asarray, (first.state.params, first.state.opt_state))

  bad = tiny_run(corpus, max_steps=30, save_every=2, eval_every=100, log_every=1)
  bad.optim.update(dict(lr=1e6, warmup_steps=0))
  trainer = Trainer(bad, str(tmp_path))
  assert int(trainer.state.step) == 4
  with pytest.raises(RunError, match="the run diverged at step .*the latest checkpoint is "
                                     "step 4"):
    trainer.train()
  stopped = int(trainer.state.step)
  assert 4 < stopped < 30
  assert trainer.built.ckpt.latest_step() == 4 and 4 in trainer.built.ckpt.latest.all_steps()
  trainer.close()

  resumed = Trainer(good, str(tmp_path))  # what it kept is the whole, finite state of step 4
  assert int(resumed.state.step) == 4
  assert bool(all_finite((resumed.state.params, resumed.state.opt_state)))
  jax.tree.map(np.testing.assert_array_equal, kept,
               jax.tree.map(np.asarray, (resumed.state.params, resumed.state.opt_state)))
  resumed.close()
