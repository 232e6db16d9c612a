"""The one exception type for mistakes a user can fix.

The CLI turns a `UserError` into a one-line message and exit code 2; anything else is a bug and keeps its
traceback.
"""


class UserError(Exception):
    """A problem with the user's input (data, options, paths), with a message that says what to do."""


def warn(message):
    """Tell the user about something worth a look that does not stop the run."""
    import sys

    print(f"cxr: warning: {message}", file=sys.stderr, flush=True)
