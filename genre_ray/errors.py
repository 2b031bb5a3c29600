"""The one exception family for errors a user can cause, and how commands report them."""
from __future__ import annotations

import errno
import functools
import sys
from typing import Callable, NoReturn


class UserError(Exception):
    """A problem the user can fix: the message names the thing and the fix."""


def exit_on_user_error(main: Callable[..., int | None]) -> Callable[..., NoReturn]:
    """Wrap a command's `main`: a UserError becomes one line on stderr and exit code 2.

    So is a path the system refuses for its length (ENAMETOOLONG), whichever flag gave
    it: every place that looks at a path would otherwise need its own guard. Output never
    fails on a file name that is not valid UTF-8 (printed escaped, as \\udce9). Anything
    else is a bug and keeps its traceback.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> NoReturn:
        for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 prints escaped
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(errors="backslashreplace")
        try:
            code = main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except OSError as err:
            if err.errno != errno.ENAMETOOLONG:
                raise
            name = str(err.filename or "")
            print(f"error: a path given is too long for this system ({name[:60]}...); "
                  "pass a shorter one", file=sys.stderr)
            sys.exit(2)
        sys.exit(code or 0)

    return wrapper
