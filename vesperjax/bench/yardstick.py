"""What a timing is read against: the machine's speed now, peak memory, CPU time.

A shared VM's cores do not run at one speed, so step times from different runs compare
only at similar yardsticks (`matmul_gflops`, measured just before and after timing).
"""
from __future__ import annotations

import platform
import resource
import time

import numpy as np


def peak_memory() -> tuple[int | None, str]:
  """(bytes, source): the device allocator's peak, else this process's max RSS."""
  import jax
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # noqa: BLE001  (backends without allocator stats)
    stats = None
  if stats and "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device_peak_bytes_in_use"
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  scale = 1 if platform.system() == "Darwin" else 1024  # Linux reports KiB
  return int(rss * scale), "process_max_rss (host memory: no device allocator stats)"


def matmul_gflops(seconds: float = 0.3) -> float:
  """The median rate of a fixed fp32 [2048,256] @ [256,1024] matmul on device 0, now.

  Printed beside step times: its rate moves with the host's placement on a shared VM
  (docs/benchmarks.md, "The VM's speed is not constant").
  """
  import jax
  import jax.numpy as jnp
  a, b = jnp.ones((2048, 256), jnp.float32), jnp.ones((256, 1024), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  rates, end = [], time.perf_counter() + seconds
  while time.perf_counter() < end or len(rates) < 3:
    start = time.perf_counter()
    f(a, b).block_until_ready()
    rates.append(2 * 2048 * 256 * 1024 / (time.perf_counter() - start) / 1e9)
  return float(np.median(rates))


def cpu_seconds() -> float:
  """This process's CPU time so far (user + system, all threads)."""
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime
