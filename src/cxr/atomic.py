"""Write files so that readers see either the old file or the complete new one, never half of it."""

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed.

    The temporary name keeps the final suffix, because Keras and matplotlib choose the format from it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a long name (up to the file system's 255 bytes) must leave room for the temporary name's additions
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem[:100]}.", suffix=f".partial{path.suffix}")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs should get the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path, text):
    """UTF-8; a file name that isn't valid UTF-8 (held by Python as surrogates) is written as its own bytes."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8", errors="surrogateescape")


def write_bytes(path, data):
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def copy_file(src, dst):
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def file_sha256(path):
    """A file's SHA-256 as hex, read a block at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what makes a spreadsheet read a cell as a formula (OWASP)


def spreadsheet_safe(value):
    """`value` for a CSV cell: a text that a spreadsheet would run as a formula (a file named
    '=HYPERLINK(...).jpeg') gets a leading apostrophe, as OWASP advises; numbers and other text are as they are."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def from_spreadsheet_safe(text):
    """The text `spreadsheet_safe` made a cell of, read back."""
    return text[1:] if text.startswith("'") and text[1:].startswith(FORMULA_STARTS) else text
