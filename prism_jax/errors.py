"""User-facing errors: one line, naming the problem, exit code 2 -- never a deep traceback."""

from __future__ import annotations

import errno
import functools
import sys


class UserError(Exception):
  """Something the user typed or pointed at is wrong; the message says what."""


class ConfigError(UserError):
  """A configuration key or value that cannot be used (here, not in config.py, so that the
  range table in limits.py, which config.py imports, can raise it without a circle)."""


def exit_on_user_error(main):
  """Wraps an entry point so UserError prints `error: ...` on one line and exits 2."""

  @functools.wraps(main)
  def wrapper(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except UserError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    except OSError as e:  # a path the user gave: missing, unwritable, read-only, disk full
      reason = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
      where = f": {e.filename}" if e.filename else ""
      print(f"error: {reason}{where}", file=sys.stderr)
      sys.exit(2)
    except KeyboardInterrupt:
      print("interrupted", file=sys.stderr)
      sys.exit(130)

  return wrapper
