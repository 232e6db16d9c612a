"""Messages for the user: the one exception type for mistakes they can fix, and warnings.

The CLI turns a `UserError` into a one-line message and exit code 2; anything else is a bug and keeps its
traceback.
"""

import sys


class UserError(Exception):
    """A problem with the user's input (data, options, paths), with a message that says what to do."""


def warn(message):
    """Tell the user about something worth a look that does not stop the run."""
    print(f"cxr: warning: {message}", file=sys.stderr, flush=True)


def list_paths(paths, limit=5):
    """'a, b, c and 7 more': enough paths to find the problem without flooding the terminal."""
    paths = [str(p) for p in paths]
    return ", ".join(paths[:limit]) + (f" and {len(paths) - limit} more" if len(paths) > limit else "")
