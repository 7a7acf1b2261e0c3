"""What a command is told, checked before anything heavy runs: a refused input is one line
`<command>: error: ...` on stderr and an exit code of docs/operations.md's table (2 a bad
flag, 4 a checkpoint that cannot be read, 6 an output that cannot be written), never a
traceback. Imports no JAX, so a bad flag is refused in the time it takes to parse it.
"""
import argparse
import contextlib
import math
import os
import re
import sys
from typing import Sequence

from absl import flags

BAD_FLAG, BAD_CHECKPOINT, NOT_WRITABLE = 2, 4, 6


class InputError(ValueError):
  """A command-line choice that does not fit what is on disk: one line naming the flag (and
  what exists), and the exit `code` of docs/operations.md's table: 2 a bad flag, 4 a
  checkpoint that cannot be read, 6 an output that cannot be written."""

  def __init__(self, message: str, code: int = BAD_FLAG):
    super().__init__(message)
    self.code = code


def fail(command: str | None, code: int, message: str):
  """One line `<command>: error: <message>` (`error: ...` for None) on stderr; exit `code`."""
  print(f"{command + ': ' if command else ''}error: {message}", file=sys.stderr)
  sys.exit(code)


def flags_parser(command: str | None, config=None):
  """absl's flag parsing for `app.run(main, flags_parser=...)`, but a flag it cannot parse
  (`--steps=abc`), an unknown or a missing one, or an argument that is not a flag, is one
  line and exit 2 (absl's own: the help text and exit 1). With `config`, a config flag's
  holder (ml_collections' `DEFINE_config_file`), so is a config file that does not load
  and an override of a key it does not have."""
  def parse(argv):
    try:
      remaining = flags.FLAGS(argv)
      if config is not None and config.value is not None:
        config.value.keys()  # a config file that failed to load says so on first use
    except (AttributeError, KeyError) as e:
      fail(command, BAD_FLAG, _unknown_key(e, argv))
    except Exception as e:  # pylint: disable=broad-except
      # A config file's own error arrives with its traceback as text: its last line says it.
      text = str(e)
      lines = [line.strip() for line in text.splitlines() if line.strip()] or [
          type(e).__name__]
      own = isinstance(e, flags.Error) and "Traceback" not in text  # absl's: the first line
      line = lines[0] if own else lines[-1]
      given = [a for a in argv if a.startswith("--config=")]
      if not own and given and "--config" not in line:  # which file it was
        line = f"{given[-1]}: {line}"
      fail(command, BAD_FLAG, line)
    if len(remaining) > 1:
      fail(command, BAD_FLAG, f"unexpected arguments {remaining[1:]} (flags are --name=value)")
    return remaining
  return parse


def _unknown_key(error: BaseException, argv) -> str:
  """ml_collections' error for an override of an unknown key, as one line naming the flag as
  typed and the closest key. At any depth: a nested key's KeyError arrives wrapped in an
  AttributeError, its text "'key'\nDid you mean "other" instead of "key"?"."""
  inner = error.args[0] if error.args else error
  text = str(inner.args[0] if isinstance(inner, BaseException) and inner.args else inner)
  key = text.splitlines()[0].strip("\"'") if text else type(error).__name__
  suggestion = re.search(r'Did you mean "([^"]+)"', text)
  given = [a.split("=")[0] for a in argv if a.startswith("--config.")
           and key in a.split("=")[0].split(".")]
  return (f"{given[0] if given else key}: the config has no key {key!r}"
          f"{f' (did you mean {suggestion.group(1)!r}?)' if suggestion else ''}")


@contextlib.contextmanager
def refusals(command: str):
  """Inside, a refused input is one line and its exit code: an InputError its own, a
  checkpoint that cannot be read (runtime/checkpointing's CheckpointError) 4, and a
  ValueError, a choice that does not fit the run (a step count, a w), 2."""
  try:
    yield
  except InputError as e:
    fail(command, e.code, str(e))
  except ValueError as e:
    fail(command, BAD_FLAG, str(e))
  except RuntimeError as e:
    checkpointing = sys.modules.get("multistep_cm.runtime.checkpointing")
    if checkpointing is None or not isinstance(e, checkpointing.CheckpointError):
      raise
    fail(command, BAD_CHECKPOINT, str(e))


def positive(flag: str, value: int):
  """Raises InputError unless `value` (of `--flag`) is a positive integer."""
  if value is None or value < 1:
    raise InputError(f"--{flag} must be a positive integer, got {value}")


def numbers(flag: str, values: Sequence[str], kind=int, minimum=None) -> list:
  """`--flag`'s comma-separated values as `kind` (int or float), each finite and at least
  `minimum` if given; raises InputError naming the flag and the values it cannot take."""
  def bad(v):
    try:
      x = kind(v)
    except (TypeError, ValueError):
      return True
    return not math.isfinite(x) or (minimum is not None and x < minimum)
  wrong = [v for v in values if bad(v)]
  if wrong or not values:
    what = "integers" if kind is int else "numbers"
    bound = f" >= {minimum}" if minimum is not None else ""
    raise InputError(f"--{flag}={','.join(values)}: expected {what}{bound}, got "
                     f"{wrong or 'nothing'}")
  return [kind(v) for v in values]


def parse_bool(text: str) -> bool:
  """An argparse `type=` for a true|false flag (also 1|0)."""
  if text.lower() not in ("true", "false", "1", "0"):
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")
  return text.lower() in ("true", "1")


def check_writable(directory: str, flag: str):
  """Raises InputError (exit 6) unless a file can be created in `directory` (made if
  missing; remote paths are not checked)."""
  if "://" in directory:
    return
  from multistep_cm.runtime import checkpointing  # pylint: disable=g-import-not-at-top
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise InputError(f"{flag}: cannot write to {directory!r}: not a directory",
                     code=NOT_WRITABLE)
  try:
    os.makedirs(directory, exist_ok=True)
    checkpointing.probe_writable(directory)
  except OSError as e:
    raise InputError(f"{flag}: cannot write to {directory!r}: {e.strerror or e}",
                     code=NOT_WRITABLE) from None


def check_output_file(path: str | None, flag: str):
  """`check_writable` for the directory an output file `path` goes to (None: no output)."""
  if path is not None:
    if os.path.isdir(path):
      raise InputError(f"{flag}={path} is a directory; name a file", code=NOT_WRITABLE)
    check_writable(os.path.dirname(os.path.abspath(path)), f"{flag}={path}")
