"""The step loop and its hook registry: the cadence of every periodic action lives here.

An action is a plain callable on the finished step's `StepInfo`; the loop holds when it
runs as a `Hook(fn, every, at_end)`, as Levanter's hooks do: `every` is one period or
several (the action is due when any divides the step), `at_end` runs it once more at the
run's last step. So an action's body never tests the step number, and no action needs
another's cadence. Hooks run in registration order; one that sets `info.stop` ends the
loop after that step (the hooks after it do not run).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable


@dataclasses.dataclass
class StepInfo:
  """One finished step, as the actions see it."""
  step: int
  state: Any  # TrainState after the step
  metrics: dict  # the step's metrics, still on device
  stop: str | None = None  # why the loop ends after this step, once an action says so


@dataclasses.dataclass(frozen=True)
class Hook:
  fn: Callable[[StepInfo], None]
  every: int | tuple[int, ...] = 1
  at_end: bool = False

  def due(self, step: int, last: int | None) -> bool:
    periods = self.every if isinstance(self.every, tuple) else (self.every,)
    return any(p > 0 and step % p == 0 for p in periods) or (self.at_end and step == last)


class StepLoop:
  """The jit step on each next batch, then the due hooks on its StepInfo, until step
  `end` or until a hook stops it. `state` and `step` are always the last finished
  step's, also when a step or a hook raises. `last`: the run's last step, for `at_end`
  hooks (a run stopped early by `end` does not count it as its last)."""

  def __init__(self, train_step, next_batch, hooks: Iterable[Hook | Callable], state,
               step: int, last: int | None = None):
    self.train_step, self.next_batch = train_step, next_batch
    self.hooks = [h if isinstance(h, Hook) else Hook(h) for h in hooks]
    self.state, self.step, self.last = state, step, last

  def run(self, end: int) -> str | None:
    """Why the loop stopped before `end` (a hook's reason), or None."""
    while self.step < end:
      self.state, metrics = self.train_step(self.state, self.next_batch())
      self.step += 1
      info = StepInfo(self.step, self.state, metrics)
      for hook in self.hooks:
        if hook.due(self.step, self.last):
          hook.fn(info)
          if info.stop is not None:
            return info.stop
    return None
