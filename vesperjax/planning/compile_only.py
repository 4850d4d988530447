"""What every deviceless compile shares, GPU or TPU: staying out of jax's persistent
compilation cache."""
from __future__ import annotations

import contextlib
import warnings


@contextlib.contextmanager
def no_compilation_cache():
  """Compile inside this block without jax's persistent compilation cache: a compile-only
  client cannot read an entry back (jax would warn and compile again). A process already
  using the cache still looks keys up: that warning is silenced, and nothing is written
  (min compile time). Private jax API: where it moved, the cache is used as usual."""
  with contextlib.ExitStack() as stack:
    stack.enter_context(warnings.catch_warnings())
    warnings.filterwarnings("ignore", message="Error reading persistent compilation cache")
    try:
      from jax._src import config  # pylint: disable=g-import-not-at-top
      stack.enter_context(config.enable_compilation_cache(False))
      stack.enter_context(config.persistent_cache_min_compile_time_secs(1e12))
    except (ImportError, AttributeError, TypeError):
      pass
    yield
