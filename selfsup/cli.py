"""Shared command-line plumbing: config files with overrides, one-line errors.

Every entry point (`selfsup.train`, `selfsup.bench`, `evals.linear_probe`) runs through
`run_main`, which turns a `UserError` (or a bad flag) into one line on stderr and exit
status 2, and leaves real bugs with their traceback.
"""

import sys

from absl import flags

from selfsup.errors import UserError


def run_main(main, argv=None):
  argv = list(sys.argv if argv is None else argv)
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e).splitlines()[0])
  try:
    return main(rest)
  except UserError as e:
    _fail(str(e))
  except KeyboardInterrupt:
    _fail("interrupted")


def _fail(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)

