"""Progress of the steps that take more than a few seconds: a count and an ETA (tqdm) on stderr.

A bar appears only once a step has run DELAY_SECONDS, so quick steps print nothing. On a terminal, one bar redrawn
in place; in a log or a pipe, a plain line now and then (every LOG_SECONDS, and the last), so that a log shows how
far a step got without a line per image. `--quiet` (env CXR_QUIET=1) silences
them, as `--verbose` brings back the libraries' own lines (`cxr.errors`).
"""

import functools
import os
import sys

QUIET_VARIABLE = "CXR_QUIET"
DELAY_SECONDS = 2
LOG_SECONDS = 30  # how often a step writes a plain line when stderr is not a terminal


def quiet():
    return os.environ.get(QUIET_VARIABLE) == "1"


class _Lines:
    """A file for tqdm that turns its in-place redraws ("\\r...") into whole lines, for logs and pipes."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        text = text.replace("\r", "").rstrip()
        if text:
            self.stream.write(text + "\n")

    def flush(self):
        self.stream.flush()


def counted(blocks, total, desc, unit="image"):
    """The row blocks (arrays) of `blocks`, passed through while a bar counts their rows to `total`."""
    with progress(total=total, desc=desc, unit=unit) as bar:
        for block in blocks:
            bar.update(len(block))
            yield block


def progress(iterable=None, total=None, desc="", unit="image", show=True):
    """`iterable` wrapped in a progress bar that counts `unit`s to `total` (or len(iterable)); update it by hand
    (`.update(n)`) when `iterable` is None. Nothing is shown with --quiet, or where `show` is false."""
    stream = sys.stderr
    terminal = stream.isatty()
    options = dict(total=total, desc=desc, unit=unit, disable=quiet() or not show, leave=True, delay=DELAY_SECONDS)
    if terminal:
        from tqdm import tqdm

        return tqdm(iterable, file=stream, dynamic_ncols=True, mininterval=0.2, **options)
    return _log_bar()(iterable, file=_Lines(stream), mininterval=LOG_SECONDS, ascii=True,
                      bar_format="{desc}: {n_fmt}/{total_fmt} {unit}s ({percentage:.0f} %), {elapsed} elapsed, "
                                 "{remaining} to go", **options)


@functools.cache
def _log_bar():
    """tqdm for logs (imported on first use: 0.15 s that `cxr predict` of one image need not pay), which also
    writes the last line of a step that outlasted DELAY_SECONDS but ended before its first line was due."""
    from tqdm import tqdm

    class LogBar(tqdm):
        def close(self):
            if (not self.disable and self.last_print_t < self.start_t + self.delay
                    and self._time() - self.start_t >= self.delay):
                self.last_print_t = self._time()  # so that tqdm's close writes the last line
            super().close()

    return LogBar
