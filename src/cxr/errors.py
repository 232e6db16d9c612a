"""Messages for the user: the one exception type for mistakes they can fix, and warnings.

The CLI turns a `UserError` into a one-line message and exit code 2; anything else is a bug and keeps its
traceback.
"""

import contextlib
import os
import sys
import threading

# Set by `--verbose` (for this process and the ones it starts): native libraries' log lines stay on stderr
VERBOSE_VARIABLE = "CXR_VERBOSE"
_NATIVE_OUTPUT_LOCK = threading.Lock()


class UserError(Exception):
    """A problem with the user's input (data, options, paths), with a message that says what to do."""


def warn(message):
    """Tell the user about something worth a look that does not stop the run."""
    print(f"cxr: warning: {message}", file=sys.stderr, flush=True)


def list_paths(paths, limit=5):
    """'a, b, c and 7 more': enough paths to find the problem without flooding the terminal."""
    paths = [str(p) for p in paths]
    return ", ".join(paths[:limit]) + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def quiet_libraries():
    """Keep TensorFlow's, absl's and oneDNN's start-up lines off stderr (before TensorFlow is first imported),
    unless --verbose asked for them."""
    if os.environ.get(VERBOSE_VARIABLE) != "1":
        # 3, not 2: under op determinism (the default) tf.data's rewrite of a parallel map logs a harmless line at
        # ERROR level ("NodeDef mentions attribute use_unbounded_threadpool"); real errors still raise
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@contextlib.contextmanager
def native_output_silenced(*fds):
    """Drop what native code writes to the file descriptors `fds` (stderr alone by default) meanwhile, unless
    --verbose: LiteRT's "Created TensorFlow Lite XNNPACK delegate" INFO line on stderr, which no setting turns off,
    as an interpreter is built; the quantizer's "fully_quantize: 0, inference_type: 6, ..." lines on stdout and
    stderr (fds 1 and 2), as int8 is converted. Python's own buffered writes are flushed first."""
    if os.environ.get(VERBOSE_VARIABLE) == "1":
        yield
        return
    fds = fds or (2,)
    with _NATIVE_OUTPUT_LOCK:
        sys.stdout.flush()
        sys.stderr.flush()
        saved, devnull = [os.dup(fd) for fd in fds], os.open(os.devnull, os.O_WRONLY)
        for fd in fds:
            os.dup2(devnull, fd)
        try:
            yield
        finally:
            for fd, kept in zip(fds, saved):
                os.dup2(kept, fd)
                os.close(kept)
            os.close(devnull)
