"""The measurements behind the plan for ChestX-ray14 and CheXpert (benchmarks/README.md): per-image costs of
the steps whose cost grows with the dataset, on this machine.

    .venv/bin/python benchmarks/bench_big_datasets.py [--images 200]

- decode: cxr's decode function (the one every command uses) on full-size X-rays, resized to 224 px, one
  thread: a 1024 x 1024 8-bit PNG (ChestX-ray14's format) and a 2048 x 2500 JPEG (CheXpert's and MIMIC-CXR-JPG's
  order of size), both made from the real NIH DICOM's pixels so they compress like an X-ray; and that DICOM;
- the frozen-layer pass: Lite0's frozen prefix (the default --frozen-layers) on 224 px images in LiteRT, as
  training runs it, with both cores;
- bytes per image of the decode cache and of the cached frozen-layer outputs and pooled features.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DICOM = ROOT.parent / "shared" / "data" / "dicom" / "nih-chestxray14-dx.dcm"


def per_image_ms(function, n):
    function()  # warm up
    start = time.perf_counter()
    for _ in range(n):
        function()
    return (time.perf_counter() - start) * 1000 / n


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    args = parser.parse_args()
    from cxr.data.decode import decode
    from cxr.data.dicom import read_dicom

    pixels, _ = read_dicom(DICOM, DICOM.name)
    pixels = pixels if pixels.ndim == 2 else pixels[..., 0]
    work = Path(tempfile.mkdtemp(prefix="cxr-bench-big-"))
    png, jpeg = work / "xray-1024.png", work / "xray-2048x2500.jpeg"
    Image.fromarray(pixels).resize((1024, 1024)).save(png)
    Image.fromarray(pixels).resize((2048, 2500), Image.BICUBIC).save(jpeg, quality=90)
    print(f"decode to 224 px, one thread, {args.images} repeats (ms per image):")
    for name, path in (("PNG 1024x1024", png), ("JPEG 2048x2500", jpeg), ("DICOM (NIH, 1024x1024)", DICOM)):
        size_kb = path.stat().st_size / 1024
        print(f"  {name:24s} {size_kb:7.0f} KB  {per_image_ms(lambda: decode(path, 224), args.images):6.1f} ms")

    import keras

    from cxr.model import backbones, networks
    from cxr.bundle.litert import fast_inference

    keras.utils.set_random_seed(0)
    model = networks.build_classifier("efficientnet-lite0", 2, "imagenet", 224)
    frozen = networks.default_frozen_layers(model, "efficientnet-lite0")
    prefix, _, pooled = networks.split_at_frozen_prefix(model, frozen, backbones.get("efficientnet-lite0").block_of)
    runner, engine = fast_inference(prefix, n_images=10_000)
    batch = np.random.default_rng(0).uniform(0, 255, (32, 224, 224, 3)).astype(np.float32)
    ms = per_image_ms(lambda: runner.predict_on_batch(batch), max(1, args.images // 32)) / 32
    print(f"frozen-layer pass ({frozen} layers, {engine}, batch 32, both cores): {ms:.1f} ms per image, "
          f"{1000 / ms:.0f} images/s")
    per_view = int(np.prod(prefix.output.shape[1:])) * 4
    print(f"bytes per image: decode cache {224 * 224 * 3} (uint8), frozen outputs {per_view} per view (float32 "
          f"{tuple(prefix.output.shape[1:])}), pooled features {int(np.prod(pooled.output.shape[1:])) * 4} per view")


if __name__ == "__main__":
    main()
