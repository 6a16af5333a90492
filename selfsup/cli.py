"""Shared command-line plumbing: config files with overrides, one-line errors.

Every entry point (`selfsup.train`, `selfsup.bench`, `evals.linear_probe`) runs through
`run_main`, which turns a `UserError` (or a bad flag) into one line on stderr and exit
status 2, and leaves real bugs with their traceback.
"""

import re
import sys

from absl import flags

from selfsup.errors import UserError


def run_main(main, argv=None):
  argv = list(sys.argv if argv is None else argv)
  try:
    rest = flags.FLAGS(argv)
    _check_config_files()
  except OSError as e:  # a missing config file, met while applying --config.KEY overrides
    if "config" not in str(e):
      raise
    _fail(_config_load_error("config", e))
  except SyntaxError as e:  # a config file that is not valid Python
    _fail(f"config file {e.filename}: syntax error on line {e.lineno}: {e.msg}; fix the file")
  except flags.Error as e:
    _fail(str(e).splitlines()[0])
  except UserError as e:  # raised while loading the config file (e.g. an unknown objective)
    _fail(str(e))
  except (AttributeError, KeyError) as e:
    # ml_collections raises these for an override of a key the config does not have.
    text = str(e).replace("\\n", "\n").replace("\\'", "'")
    found = re.search(r"'([A-Za-z0-9_]+)'", text)
    key = found.group(1) if found else text
    hint = re.search(r'Did you mean "([^"]+)"', text)
    bad = [a.split("=")[0] for a in argv if a.startswith("--config.") and f".{key}" in a]
    if bad and bad[0].startswith(f"--config.objectives.{key}"):
      import objectives
      _fail(f"{bad[0]}: this config has no objective {key!r}; registered objectives: "
            f"{', '.join(sorted(objectives.REGISTRY))} (add one with a config file or "
            "experiments/quickstart.py:NAME[+NAME])")
    _fail(f"unknown config key {bad[0] if bad else key}"
          + (f"; did you mean {hint.group(1)!r}?" if hint else
             "; check the spelling against the config file (each objective's options are "
             "listed in its config's objectives section)"))
  try:
    return main(rest)
  except UserError as e:
    _fail(str(e))
  except KeyboardInterrupt:
    _fail("interrupted")


def _check_config_files():
  """ml_collections defers a missing config file's error to the first access: fail now."""
  for name in list(flags.FLAGS):
    value = flags.FLAGS[name].value
    if type(value).__name__ == "_ErrorConfig":
      _fail(_config_load_error(name, object.__getattribute__(value, "_error")))


def _config_load_error(name: str, error: Exception) -> str:
  found = re.search(r"\[Errno \d+\] ([^:]+): '([^']*)'", str(error))
  detail = f"{found.group(2)}: {found.group(1)}" if found else " ".join(str(error).split())
  return (f"cannot load the config file --{name} ({detail}); pass an existing "
          "experiments/NAME.py[:ARG]")


def _fail(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


