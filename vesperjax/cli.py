"""What every vesperjax command shares: absl flag parsing, --help and --version, one-line
errors and warnings.

A user's mistake (unknown config key, wrong type, missing file, bad data) is reported as
a single `error: ...` line on stderr with exit status 2; bugs still show a traceback.
A value a run uses other than the one given is named in a `warning: ...` line.
`--help` prints the command's module docstring (its usage), its flags and, for a command
taking `--config`, the config keys with their schema defaults; `--version` prints
`vesperjax <version>`; both exit 0.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import textwrap
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


HELP_FLAGS = ("-h", "-help", "--help", "--helpfull", "--helpshort")
VERSION_FLAG = "--version"


def asked_for(argv: list[str]) -> str | None:
  """"help" or "version" when argv (after the program name, before a `--`) asks for it."""
  for arg in argv[1:]:
    if arg == "--":
      return None
    if arg in HELP_FLAGS:
      return "help"
    if arg == VERSION_FLAG:
      return "version"
  return None


def version_line() -> str:
  import vesperjax
  return f"vesperjax {vesperjax.__version__}"


def _show(value) -> str:
  """A default as the command line takes it (a string with spaces, or empty, quoted)."""
  if isinstance(value, (list, tuple)):
    return ",".join(map(str, value))
  if isinstance(value, str) and (not value or " " in value):
    return repr(value)
  return str(value)


def _flag_line(flag) -> str:
  if isinstance(flag, flags.BooleanFlag):
    head = f"--[no]{flag.name}"
  else:
    values = getattr(flag.parser, "enum_values", None)
    kind = "FILE" if flag.name == "config" else flag.flag_type().split()[-1].upper()
    head = f"--{flag.name}=" + ("|".join(values) if values else kind)
  # absl adds its own list of enum values, and a note to multi-value flags
  text = re.sub(r"^<[^>]*>: ", "", flag.help or "")
  text = re.sub(r";?\s*repeat this option to specify a list of values$", "", text)
  unset = flag.default is None or flag.default is False or flag.default == []
  if not unset and "default" not in text:
    text += f" (default: {_show(flag.default)})"
  return head + "\n" + textwrap.fill(text, 88, initial_indent=" " * 6,
                                     subsequent_indent=" " * 6)


def config_keys_help() -> str:
  """Every `--config.SECTION.KEY` with the schema's default (from `run_config`'s typed
  sections, so a new key shows at once)."""
  import dataclasses
  import typing

  from vesperjax.run_config import RunConfig
  lines = [textwrap.fill(
      "config keys: --config.SECTION.KEY=VALUE overrides a value of the --config file. "
      "Shown: the schema's defaults (an experiment file may set others); each key is "
      "explained in docs/configuration.md.", 88)]
  for name, section in typing.get_type_hints(RunConfig).items():
    fields = dataclasses.fields(section)
    if name == "model":
      items = [f"preset={section().preset};", "any ModelConfig field, None (the preset's "
               "value) by default:"] + [f.name for f in fields if f.name != "preset"]
    else:
      items = [f"{f.name}={_show(f.default)}" for f in fields]
    lines.append(textwrap.fill(" ".join(items), 88, initial_indent=f"  {name}: ",
                               subsequent_indent=" " * 6, break_on_hyphens=False))
  return "\n".join(lines)


def help_text(doc: str | None, flag_values: flags.FlagValues) -> str:
  """A command's --help: its docstring, its own flags (absl's are left out), and its
  config keys when it takes --config."""
  own = [f for module, defined in flag_values.flags_by_module_dict().items()
         if not module.startswith("absl") for f in defined
         if not f.name.startswith("config.")]
  parts = [textwrap.dedent(doc or "").strip(), "flags:"]
  parts += ["  " + _flag_line(f) for f in sorted(own, key=lambda f: f.name)]
  parts += ["  --help\n      This text.", f"  --version\n      Print '{version_line()}'."]
  text = "\n\n".join(parts[:2]) + "\n" + "\n".join(parts[2:])
  if "config" in flag_values:
    text += "\n\n" + config_keys_help()
  return text


def warn(message: str) -> None:
  """`warning: <message>` on stderr, from process 0 only (each process would repeat it)."""
  import jax
  if jax.process_index() == 0:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def run_cli(argv: list[str], body: Callable[[], int],
            flag_values: flags.FlagValues = flags.FLAGS) -> int:
  """Parse flags from argv, run body(), and turn user errors into one line + status 2.
  `--help` prints the usage of body's module (its docstring) and the flags, `--version`
  the version; both return 0 without parsing anything else."""
  asked = asked_for(argv)
  if asked == "version":
    print(version_line())
    return 0
  if asked == "help":
    print(help_text(getattr(sys.modules.get(body.__module__), "__doc__", None),
                    flag_values))
    return 0
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
    if text.startswith("Unknown command line flag"):
      text += " (--help lists the flags)"
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
