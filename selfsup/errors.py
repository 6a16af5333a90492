"""User-facing errors.

A `UserError` is a problem with what the user asked for (a name, a value, a path). The
command-line entry points print its message as one line and exit non-zero, without a
traceback; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
  """A bad input the user can fix; the message says what was wrong and what is valid."""


def unknown_name(kind: str, name: str, valid) -> UserError:
  """An error for an unknown registry name that lists the valid ones."""
  return UserError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(sorted(valid))}")
