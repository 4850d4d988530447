"""The training loop's periodic actions, one at a time, on the host (no model, no jit),
each at the cadence the trainer registers it with (`loop.Hook`)."""
import signal

import numpy as np
import pytest

from vesperjax.training import actions as act
from vesperjax.training.divergence import DivergenceGuard
from vesperjax.training.loop import Hook, StepInfo, StepLoop


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
  return StepInfo(step, state=f"state{step}",
                  metrics={"loss": np.float32(loss), "finite": np.bool_(finite)})


def fire(hooks, one, last=None):
  """What the loop does with one finished step: each due hook, until one stops it."""
  for hook in hooks:
    if hook.due(one.step, last):
      hook.fn(one)
      if one.stop is not None:
        break
  return one


def test_a_hook_is_due_on_any_of_its_periods_and_at_the_end():
  assert [s for s in range(1, 13) if Hook(print, (4, 6)).due(s, None)] == [4, 6, 8, 12]
  assert [s for s in range(1, 11) if Hook(print, 3, at_end=True).due(s, 10)] == [3, 6, 9, 10]
  assert [s for s in range(1, 6) if Hook(print).due(s, None)] == [1, 2, 3, 4, 5]
  assert not any(Hook(print, 0).due(s, 5) for s in range(1, 6))  # a period of 0: never


def test_throughput_window_leaves_out_compiling_and_pauses():
  clock = Clock()
  window = act.ThroughputWindow(first_step=1, clock=clock)
  restart = Hook(window.restart, (4, 6))  # eval every 4, save every 6
  clock.now = 30.0  # the first step compiles: not counted
  window.count(info(1))
  assert window.steps_per_s() is None
  for step in (2, 3):
    clock.now += 0.5
    window.count(info(step))
  assert window.steps_per_s() == pytest.approx(2 / 1.0)
  fire([restart], info(3))  # neither an eval nor a save step: the window stays open
  assert window.steps == 2
  clock.now += 0.5
  window.count(info(4))
  fire([restart], info(4))  # the eval at step 4 is not training time
  assert window.steps == 0 and window.start == clock.now
  resumed = act.ThroughputWindow(first_step=11, clock=clock)
  resumed.count(info(11))
  assert resumed.steps == 0  # a resumed run compiles on its first step too


def test_log_metrics_fetches_only_on_log_steps_and_the_last():
  sink, clock = Sink(), Clock()
  window = act.ThroughputWindow(1, clock=clock)
  log = act.LogMetrics(sink, window, tokens_per_step=10, lr=lambda i: 0.5 * i,
                       flops_per_token=6.0, peak=None)
  hooks = [Hook(window.count), Hook(log, 3, at_end=True)]  # log every 3, last step 8
  for step in range(1, 9):
    clock.now += 1.0
    fire(hooks, info(step, loss=float(step)), last=8)
  assert [s for s, _ in sink.written] == [3, 6, 8]
  assert [scalars["loss"] for _, scalars in sink.written] == [3.0, 6.0, 8.0]
  step3 = sink.written[0][1]
  assert step3["learning_rate"] == 1.0  # the schedule at step 3 - 1
  assert step3["tokens_per_s"] == pytest.approx(10.0) and "mfu" not in step3
  assert log.last_loss == 8.0


def test_guard_checks_on_log_and_save_steps_and_stops():
  guard = act.GuardDivergence(DivergenceGuard(2, 0))
  hooks = [Hook(guard.record), Hook(guard.check, (10, 4), at_end=True)]  # log 10, save 4
  for step in (1, 2, 3):
    one = fire(hooks, info(step, finite=step == 1), last=100)
    assert one.stop is None  # not a log or save step: nothing is asked yet
  stopped = fire(hooks, info(4, loss=float("nan"), finite=False), last=100)
  assert stopped.stop == "diverged" and "3 consecutive steps" in guard.diverged


def test_checkpoint_is_not_saved_while_steps_are_skipped():
  saved, logged = [], []
  guard = DivergenceGuard(0, 0)
  checkpoint = Hook(act.PeriodicCheckpoint(lambda step, state: saved.append(step), guard,
                                           logged.append), 2)
  fire([checkpoint], info(1))
  fire([checkpoint], info(2))
  guard.streak = 1
  fire([checkpoint], info(4))
  assert saved == [2] and logged == ["step 4: not saved while steps are being skipped"]


def test_eval_keeps_the_best_only_for_a_finite_state():
  sink, best = Sink(), []
  finite = {"state2": True, "state4": False}
  evaluate = Hook(act.EvaluateAndKeepBest(lambda state: 3.0,
                                          lambda step, state, loss: best.append(step),
                                          finite.get, sink), 2, at_end=True)
  for step in (1, 2, 4, 5):  # eval every 2; 5 is the last step
    fire([evaluate], info(step), last=5)
  assert best == [2] and [s for s, _ in sink.written] == [2, 4, 5]
  assert sink.written[0][1]["eval_loss"] == 3.0
  none = act.EvaluateAndKeepBest(lambda state: None, best.append, finite.get, sink)
  none(info(2))  # no validation data: nothing logged or saved
  assert best == [2] and len(sink.written) == 3


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


def test_step_loop_runs_each_hook_at_its_cadence_and_at_the_last_step():
  calls = []
  loop = StepLoop(lambda state, batch: (state + 1, {}), lambda: None,
                  [Hook(lambda i: calls.append(("every", i.step))),
                   Hook(lambda i: calls.append(("3", i.step)), 3, at_end=True)],
                  state=0, step=0, last=7)
  loop.run(7)
  assert [s for k, s in calls if k == "3"] == [3, 6, 7]
  assert [s for k, s in calls if k == "every"] == list(range(1, 8))


def test_peak_flops_of_each_tpu_generation_and_gpu():
  """Each TPU generation's chip, named as jax names it (tpu_targets), gets its own spec
  sheet's bf16 peak: v5p ("TPU v5") is not read as v5e ("TPU v5 lite") or the reverse."""
  from vesperjax.planning import tpu_targets
  from vesperjax.training.actions import peak_flops
  spec = {"v4": 275e12, "v5e": 197e12, "v5p": 459e12, "v6e": 918e12}
  assert {n: peak_flops(g.device_kind) for n, g in tpu_targets.GENERATIONS.items()} == spec
  assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert peak_flops("cpu") is None
