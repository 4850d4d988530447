"""Stops a diverging run: too many consecutive skipped (non-finite) steps, or a loss spike.

The train step already skips non-finite steps in-graph; this watches the pattern from the
host, reading each step's `finite` flag only at log steps (no extra host sync), and says
why the run should stop. The trainer then exits non-zero without saving the diverged
state, so the last good checkpoint stays the latest.
"""
from __future__ import annotations

import math
import statistics

import jax


class DivergenceGuard:

  def __init__(self, max_skipped_steps: int, loss_spike_factor: float, window: int = 10):
    self.max_skipped = max_skipped_steps  # 0: never stop for skipped steps
    self.spike_factor = loss_spike_factor  # 0: never stop for a spike
    self.window = window
    self.streak = 0  # consecutive skipped steps up to the last check
    self._flags = []  # this window's per-step finite flags, still on device
    self._losses = []  # recent finite logged losses

  def record(self, finite) -> None:
    """Keep one step's `finite` flag (a device scalar: nothing waits for it)."""
    self._flags.append(finite)

  def check(self, step: int, loss: float) -> str | None:
    """At a log step: why the run diverged, or None."""
    for ok in jax.device_get(self._flags):
      self.streak = 0 if bool(ok) else self.streak + 1
    self._flags = []
    if self.max_skipped and self.streak >= self.max_skipped:
      return (f"step {step}: {self.streak} consecutive steps were not finite and skipped "
              f"(train.max_skipped_steps={self.max_skipped})")
    if not math.isfinite(loss):
      return None
    recent = self._losses[-self.window:]
    if self.spike_factor and recent:
      median = statistics.median(recent)
      if loss > self.spike_factor * median:
        return (f"step {step}: loss {loss:.4g} is over {self.spike_factor:g}x the median "
                f"{median:.4g} of the last {len(recent)} logged losses "
                "(train.loss_spike_factor)")
    self._losses.append(loss)
    return None
