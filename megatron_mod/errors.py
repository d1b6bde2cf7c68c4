"""One base for the errors a user can fix (bad input, configuration, checkpoint), one way to report.

Every tool catches these (and the ``FileNotFoundError`` / ``ValueError`` raised by argument
validation), prints ``error: <message>`` on stderr and exits with :data:`USER_ERROR_EXIT_CODE`;
anything else is a bug and keeps its traceback. The project's error classes subclass
:class:`MegatronModError` and, for compatibility with callers that catch them so, the built-in
they have always been (``ConversionError`` is still a ``ValueError``).
"""

from __future__ import annotations

import sys

__all__ = ["MegatronModError", "USER_ERROR_EXIT_CODE", "USER_ERRORS", "report"]

USER_ERROR_EXIT_CODE = 2
"""Exit code of every tool for an error the user can fix (argparse uses 2 for bad flags too)."""


class MegatronModError(Exception):
    """An error in the user's input, configuration or files, with a message that says what to do."""


# What tools treat as the user's error: the project's own, a missing file, and a rejected value.
USER_ERRORS = (MegatronModError, FileNotFoundError, FileExistsError, ValueError)


def report(err: BaseException, prog: str | None = None) -> int:
    """Print ``err`` for a user (one line, stderr) and return the exit code to use."""
    name = prog or sys.argv[0].rsplit("/", 1)[-1]
    print(f"{name}: error: {err}", file=sys.stderr)
    return USER_ERROR_EXIT_CODE
