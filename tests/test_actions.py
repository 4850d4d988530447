"""The training loop's periodic actions, one at a time, on the host (no model, no jit)."""
import signal

import numpy as np
import pytest

from vesperjax.training import actions as act
from vesperjax.training.divergence import DivergenceGuard
from vesperjax.training.trainer import StepLoop


class Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


class Sink:
  def __init__(self):
    self.written = []

  def write(self, step, scalars):
    self.written.append((step, scalars))

  def postfix(self, **values):
    pass


def info(step, loss=1.0, finite=True):
  return act.StepInfo(step, state=f"state{step}",
                      metrics={"loss": np.float32(loss), "finite": np.bool_(finite)})


def test_throughput_window_leaves_out_compiling_and_pauses():
  clock = Clock()
  window = act.ThroughputWindow(first_step=1, eval_every=4, save_every=6, clock=clock)
  clock.now = 30.0  # the first step compiles: not counted
  window.count(info(1))
  assert window.steps_per_s() is None
  for step in (2, 3):
    clock.now += 0.5
    window.count(info(step))
  assert window.steps_per_s() == pytest.approx(2 / 1.0)
  window.restart(info(3))  # neither an eval nor a save step: the window stays open
  assert window.steps == 2
  clock.now += 0.5
  window.count(info(4))
  window.restart(info(4))  # the eval at step 4 is not training time
  assert window.steps == 0 and window.start == clock.now
  resumed = act.ThroughputWindow(first_step=11, eval_every=4, save_every=6, clock=clock)
  resumed.count(info(11))
  assert resumed.steps == 0  # a resumed run compiles on its first step too


def test_log_metrics_fetches_only_on_log_steps_and_the_last():
  sink, clock = Sink(), Clock()
  window = act.ThroughputWindow(1, 100, 100, clock=clock)
  log = act.LogMetrics(3, 8, sink, window, tokens_per_step=10, lr=lambda i: 0.5 * i,
                       flops_per_token=6.0, peak=None)
  for step in range(1, 9):
    clock.now += 1.0
    window.count(info(step))
    one = info(step, loss=float(step))
    log(one)
    assert one.loss == (float(step) if step in (3, 6, 8) else None)
  assert [s for s, _ in sink.written] == [3, 6, 8]
  step3 = sink.written[0][1]
  assert step3["learning_rate"] == 1.0  # the schedule at step 3 - 1
  assert step3["tokens_per_s"] == pytest.approx(10.0) and "mfu" not in step3
  assert log.last_loss == 8.0


def test_guard_checks_on_log_and_save_steps_and_stops():
  guard = act.GuardDivergence(DivergenceGuard(2, 0), log_every=10, save_every=4, last=100)
  for step in (1, 2, 3):
    one = info(step, finite=step == 1)
    guard(one)
    assert one.stop is None  # not a log or save step: nothing is asked yet
  stopped = info(4, loss=float("nan"), finite=False)
  guard(stopped)
  assert stopped.stop == "diverged" and "3 consecutive steps" in guard.diverged


def test_checkpoint_is_not_saved_while_steps_are_skipped():
  saved, logged = [], []
  guard = DivergenceGuard(0, 0)
  checkpoint = act.PeriodicCheckpoint(2, lambda step, state: saved.append(step), guard,
                                       logged.append)
  checkpoint(info(1))
  checkpoint(info(2))
  guard.streak = 1
  checkpoint(info(4))
  assert saved == [2] and logged == ["step 4: not saved while steps are being skipped"]


def test_eval_keeps_the_best_only_for_a_finite_state():
  sink, best = Sink(), []
  finite = {"state2": True, "state4": False}
  evaluate = act.EvaluateAndKeepBest(2, 5, lambda state: 3.0,
                                     lambda step, state, loss: best.append(step),
                                     finite.get, sink)
  for step in (1, 2, 4):
    evaluate(info(step))
  assert best == [2] and [s for s, _ in sink.written] == [2, 4]
  assert sink.written[0][1]["eval_loss"] == 3.0
  none = act.EvaluateAndKeepBest(2, 5, lambda state: None, best.append, finite.get, sink)
  none(info(2))  # no validation data: nothing logged or saved
  assert best == [2] and len(sink.written) == 2


def test_signal_stops_after_the_step():
  signals = act.Signals()
  stop = act.StopOnSignal(signals)
  one = info(1)
  stop(one)
  assert one.stop is None
  signals.received = signal.SIGTERM
  stop(one)
  assert one.stop == "SIGTERM"


def test_step_loop_runs_actions_in_order_and_keeps_the_last_finished_step():
  seen = []

  def step_fn(state, batch):
    if batch == "bad":
      raise RuntimeError("boom")
    return state + 1, {"loss": batch}

  def stop_at_3(i):
    seen.append(i.step)
    if i.step == 3:
      i.stop = "enough"

  later = []
  batches = iter(range(10))
  loop = StepLoop(step_fn, lambda: next(batches),
                  [stop_at_3, lambda i: later.append(i.step)], state=0, step=0)
  assert loop.run(10) == "enough"
  assert (loop.state, loop.step, seen, later) == (3, 3, [1, 2, 3], [1, 2])
  assert loop.run(5) is None and loop.step == 5  # on to `end`

  feed = iter([0, "bad"])
  failing = StepLoop(step_fn, lambda: next(feed), [], state=0, step=7)
  with pytest.raises(RuntimeError, match="boom"):
    failing.run(20)
  assert (failing.state, failing.step) == (1, 8)  # what the trainer saves before failing
