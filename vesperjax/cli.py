"""What every vesperjax command shares: absl flag parsing and one-line errors.

A user's mistake (unknown config key, wrong type, missing file, bad data) is reported as
a single `error: ...` line on stderr with exit status 2; bugs still show a traceback.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from typing import Callable

from absl import flags


from vesperjax.errors import one_line, user_errors  # noqa: F401  (commands import them here)


def _config_file_error(e: BaseException) -> str:
  return "cannot load --config: " + one_line(e).rsplit("] ", 1)[-1]


def use_compilation_cache() -> None:
  """Keep compiled programs on disk across runs, so a resumed training run or the next
  `generate` skips most compiling: in $XDG_CACHE_HOME/vesperjax/jax (~/.cache/...),
  unless JAX's own cache directory is already configured."""
  import jax
  if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
    return
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  jax.config.update("jax_compilation_cache_dir", os.path.join(root, "vesperjax", "jax"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _quiet_orbax_leftovers(unraisable, default=sys.unraisablehook) -> None:
  """Drop what orbax's reader coroutines and threads leave behind after a failed restore
  (the failure itself was already reported in one line): 'Event loop is closed', and
  the same read error again from coroutines nobody awaits any more."""
  tb = unraisable.exc_traceback
  from_orbax = False
  while tb is not None:
    from_orbax = from_orbax or "/orbax/" in tb.tb_frame.f_code.co_filename
    tb = tb.tb_next
  closed_loop = (isinstance(unraisable.exc_value, RuntimeError)
                 and "Event loop is closed" in str(unraisable.exc_value))
  if not (closed_loop or from_orbax):
    default(unraisable)


def _not_orbax_task(record) -> bool:
  """asyncio's 'exception was never retrieved' for orbax's reader tasks and futures (a
  failed restore already reported in one line): dropped."""
  text = record.getMessage()
  return not ("never retrieved" in text
              and any(m in text for m in ("/orbax/", "TensorStore", "OCDBT")))


def _not_orbax_thread_error(record) -> bool:
  """orbax's background save threads log their failure with a traceback, then it
  surfaces in the main thread, where the Checkpointer reports it in one line: dropped."""
  return not (record.levelno >= logging.ERROR and record.exc_info
              and "/orbax/" in record.pathname)


def run_cli(argv: list[str], body: Callable[[], int],
            flag_values: flags.FlagValues = flags.FLAGS) -> int:
  """Parse flags from argv, run body(), and turn user errors into one line + status 2."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  sys.unraisablehook = _quiet_orbax_leftovers
  logging.getLogger("asyncio").addFilter(_not_orbax_task)
  logging.getLogger("absl").addFilter(_not_orbax_thread_error)
  warnings.filterwarnings("ignore", category=RuntimeWarning,
                          message="coroutine '_read_array_index_and_device_put' was never")
  saved_argv = sys.argv
  try:
    sys.argv = list(argv)  # config_flags reads the --config.* overrides from sys.argv
    flag_values(argv)
  except (AttributeError, KeyError) as e:  # ml_collections: override of a missing key
    print(f"error: unknown config key {one_line(e).strip(chr(34))} in the --config "
          "overrides", file=sys.stderr)
    return 2
  except (OSError, SyntaxError) as e:  # the --config file is missing or broken
    print(f"error: {_config_file_error(e)}", file=sys.stderr)
    return 2
  except (flags.Error, TypeError, ValueError) as e:
    text = one_line(e)
    if re.match(r"flag --config\.[\w.]+=None: ", text):  # a None default is no flag value
      text += "; leave the key out to keep its default (a model key: the preset's value)"
    print(f"error: {text}", file=sys.stderr)
    return 2
  except Exception as e:  # noqa: BLE001  (the --config file's own code raised)
    print(f"error: cannot load --config: {type(e).__name__}: {one_line(e)}",
          file=sys.stderr)
    return 2
  finally:
    sys.argv = saved_argv
  try:
    return body()
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130
  except user_errors() as e:
    # what the failed work leaves unawaited (orbax's save and read coroutines) is
    # finalized after this line; the failure it would repeat is reported here
    warnings.filterwarnings("ignore", category=RuntimeWarning,
                            message=r"coroutine '.*' was never awaited")
    print(f"error: {one_line(e)}", file=sys.stderr)
    return 2
  finally:  # main() may run again in the same process (tests, notebooks)
    flag_values.unparse_flags()
    for name in [n for n in flag_values if n.startswith("config.")]:
      delattr(flag_values, name)  # config_flags registers one flag per override


def load_run_config(config_flag):
  """The parsed `--config` (with overrides applied) as a validated `RunConfig`: the one
  place a command turns the experiment's ConfigDict into the typed run."""
  from vesperjax.run_config import RunConfig
  run = config_flag.value
  if run is None:
    raise ValueError("--config FILE is required, e.g. --config experiments/tiny.py")
  try:  # a config file that failed to load raises on first use
    return RunConfig.from_config_dict(run)
  except (OSError, SyntaxError) as e:
    raise ValueError(_config_file_error(e)) from None
