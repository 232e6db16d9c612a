"""A bounded fuzz test of the one decode path every command uses.

Files built from real X-rays of the committed sample and mutated (truncated, bit-flipped, random or empty
bytes, a wrong extension, absurd dimensions in the header): each one decodes to a (size, size, 3) uint8
image or is reported unreadable (UnreadableImage), and nothing else happens. CI runs a few hundred cases;
`CXR_FUZZ_CASES=10000 .venv/bin/python -m pytest -q tests/test_fuzz_decode.py -s` runs more and prints the
counts (benchmarks/README.md).
"""

import io
import os
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from cxr.data.decode import UnreadableImage, decode_image
from cxr.data.pipeline import decode_all
from tests.conftest import SAMPLE

CASES = int(os.environ.get("CXR_FUZZ_CASES", 300))
SIZE = 32


def sources():
    """{name: bytes}: real X-rays as JPEG, 8- and 16-bit PNG and BMP."""
    jpeg = sorted((SAMPLE / "NORMAL").iterdir())[0].read_bytes()
    with Image.open(io.BytesIO(jpeg)) as img:
        grey = img.convert("L").resize((96, 96))
    out = {"x.jpeg": jpeg, "y.jpeg": sorted((SAMPLE / "PNEUMONIA").iterdir())[0].read_bytes()}
    for name, image in (("x8.png", grey), ("x16.png", Image.fromarray(np.asarray(grey, np.uint16) * 16)),
                        ("x.bmp", grey.convert("RGB"))):
        buffer = io.BytesIO()
        image.save(buffer, format={"png": "PNG", "bmp": "BMP"}[name.rsplit(".", 1)[1]])
        out[name] = buffer.getvalue()
    return out


def with_dimensions(data, rng):
    """The file with absurd width and height written into its header (JPEG SOF, PNG IHDR, BMP header)."""
    width, height = (int(v) for v in rng.choice([0, 1, 2, 65535, 30000, 100000, 2 ** 31 - 1], size=2))
    data = bytearray(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        data[16:24] = struct.pack(">II", width, height)
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # keep the CRC valid: reach the decoder
    elif data[:2] == b"BM":
        data[18:26] = struct.pack("<ii", min(width, 2 ** 31 - 1), min(height, 2 ** 31 - 1))
    else:
        sof = next((i for i in range(2, len(data) - 9) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC2)), None)
        if sof is not None:
            data[sof + 5:sof + 9] = struct.pack(">HH", min(height, 65535), min(width, 65535))
    return bytes(data)


def mutate(data, rng):
    """(kind, bytes) of one mutation of `data`."""
    kind = rng.choice(["truncate", "flip", "random", "empty", "dimensions", "header"])
    if kind == "truncate":
        return kind, data[:int(rng.integers(0, len(data)))]
    if kind == "flip":
        data = bytearray(data)
        for position in rng.integers(0, len(data), size=int(rng.integers(1, 20))):
            data[position] ^= 1 << int(rng.integers(0, 8))
        return kind, bytes(data)
    if kind == "random":
        return kind, rng.bytes(int(rng.integers(1, 5000)))
    if kind == "empty":
        return kind, b""
    if kind == "dimensions":
        return kind, with_dimensions(data, rng)
    return kind, data[:int(rng.integers(8, 64))]


def test_mutated_xrays_decode_or_are_reported_unreadable(tmp_path):
    originals = sources()
    names = sorted(originals)
    extensions = [".jpeg", ".png", ".bmp", ".jpg"]
    counts = {"decoded": 0, "unreadable": 0}
    started = time.perf_counter()
    for case in range(CASES):
        rng = np.random.default_rng(case)
        source = names[case % len(names)]
        kind, data = mutate(originals[source], rng)
        extension = extensions[int(rng.integers(0, len(extensions)))]  # often the wrong one
        path = tmp_path / f"case{case}{extension}"
        path.write_bytes(data)
        try:
            image = decode_image(path, SIZE)
        except UnreadableImage as error:
            assert path.name in str(error)
            counts["unreadable"] += 1
        except Exception as error:  # anything else is the bug this test exists to find
            pytest.fail(f"case {case} ({kind} of {source} as {extension}): {type(error).__name__}: {error}")
        else:
            assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8, (case, kind, source)
            counts["decoded"] += 1
        path.unlink()
    print(f"\n{CASES} fuzz cases in {time.perf_counter() - started:.1f} s: {counts}")
    assert counts["unreadable"] > 0 and counts["decoded"] > 0


def test_the_decode_cache_keeps_going_past_mutated_files(tmp_path):
    rng = np.random.default_rng(1)
    originals = sources()
    paths = []
    for i, (name, data) in enumerate(sorted(originals.items())):
        good = tmp_path / f"good{i}{os.path.splitext(name)[1]}"
        good.write_bytes(data)
        bad = tmp_path / f"bad{i}{os.path.splitext(name)[1]}"
        bad.write_bytes(mutate(data, rng)[1][:40])
        paths += [good, bad]
    images, unreadable = decode_all(paths, SIZE, tmp_path / "cache")
    assert images.shape == (len(paths), SIZE, SIZE, 3)
    assert set(unreadable) <= {p for p in paths if p.name.startswith("bad")}
    assert not {p for p in paths if p.name.startswith("good")} & set(unreadable)
