"""Throughput of `cxr predict` on a folder, and of its forward pass in LiteRT vs Keras.

    .venv/bin/python benchmarks/bench_predict.py                       # 2,000 training X-rays, fresh Lite0
    .venv/bin/python benchmarks/bench_predict.py --model outputs/models/model.h5 --limit 500
    .venv/bin/python benchmarks/bench_predict.py --model outputs/models/model.h5 --stock

Without --model it saves an ImageNet Lite0 with an untrained 2-class head (speed doesn't depend on the
head's weights). It then times, on the same image files:
- `cxr predict FILES --format csv` end to end in a child process (start-up, loading, decoding, inference),
  once with an empty LiteRT cache (includes the conversion) and once with the cache filled, at each of
  --precisions (default: auto, what training chose, e.g. the views on demand; and float32, every view);
- `predict.predict_files` in this process, after start-up: LiteRT vs the Keras model, with the largest
  difference between their calibrated probabilities.
With --stock, also what a user would write instead: the model's `cxr export --format tflite` file run by the
stock LiteRT script below (PIL to decode and resize, one image per `invoke`), with LiteRT's default thread count
and with every core, in a child process on the same files.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "chest_xray" / "train"


def fresh_model(folder, img_size):
    from cxr.model.networks import build_classifier
    from cxr.bundle.saved_model import SavedModel

    model = build_classifier("efficientnet-lite0", 2, "imagenet", img_size)
    return SavedModel.from_keras(model, ["NORMAL", "PNEUMONIA"], img_size, "efficientnet-lite0").save(folder)


STOCK_SCRIPT = '''
import sys
import numpy as np
from PIL import Image
from ai_edge_litert.interpreter import Interpreter

model, files, threads = sys.argv[1], open(sys.argv[2]).read().split("\\n"), int(sys.argv[3])
interpreter = Interpreter(model_path=model, num_threads=threads or None)
interpreter.allocate_tensors()
source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
side = int(source["shape"][1])
for path in files:
    image = Image.open(path).convert("RGB").resize((side, side), Image.BILINEAR)
    interpreter.set_tensor(source["index"], np.asarray(image, dtype=np.float32)[None])
    interpreter.invoke()
    print(path, *interpreter.get_tensor(target["index"])[0], sep=",")
'''


def time_stock(files, model, folder, threads):
    """Seconds the stock LiteRT script takes for `files` on the exported `model.tflite` (`threads` 0: LiteRT's
    default)."""
    script, listing = Path(folder) / "stock_litert.py", Path(folder) / "files.txt"
    script.write_text(STOCK_SCRIPT)
    listing.write_text("\n".join(map(str, files)))
    start = time.perf_counter()
    subprocess.run([sys.executable, str(script), str(model), str(listing), str(threads)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    return time.perf_counter() - start


def time_cli(files, model, cache_home, precision):
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home), "TF_CPP_MIN_LOG_LEVEL": "2"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cxr", "predict", *map(str, files), "--model", str(model),
                    "--format", "csv", "--precision", precision], env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="folder of images (searched recursively)")
    parser.add_argument("--limit", type=int, default=2000, help="number of images")
    parser.add_argument("--model", type=Path, help="a saved cxr model (default: a fresh ImageNet Lite0)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--stock", action="store_true", help="also time the stock LiteRT script on the tflite export")
    parser.add_argument("--precisions", nargs="+", default=["auto", "float32"], choices=["auto", "float32", "int8"])
    args = parser.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from cxr.commands.predict import list_inputs

    files = list_inputs([args.source])[:args.limit]
    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model or fresh_model(tmp, args.img_size)
        cache_home = Path(tmp) / "cache"
        print(f"{len(files)} images from {args.source}, model {args.model or 'fresh efficientnet-lite0'}, "
              f"{len(os.sched_getaffinity(0))} CPU cores")
        for precision in args.precisions:
            for cache in ("empty ", "filled"):
                seconds = time_cli(files, model_path, cache_home / precision, precision)
                print(f"cxr predict --precision {precision:7}, end to end, LiteRT cache {cache} {seconds:7.1f} s  "
                      f"{len(files) / seconds:6.1f} images/s", flush=True)
        if args.stock:
            from cxr.commands.export import export

            tflite = next(p for p in export(model_path, ["tflite"], Path(tmp) / "export") if p.suffix == ".tflite")
            for threads, label in ((0, "LiteRT's default threads"), (len(os.sched_getaffinity(0)), "every core")):
                seconds = time_stock(files, tflite, tmp, threads)
                print(f"stock LiteRT script on the tflite export, {label:24} {seconds:7.1f} s  "
                      f"{len(files) / seconds:6.1f} images/s")

        os.environ["XDG_CACHE_HOME"] = str(cache_home / "float32")
        import numpy as np

        from cxr.commands.predict import predict_files
        from cxr.bundle.saved_model import SavedModel

        litert, keras = SavedModel.load(model_path, "float32"), SavedModel.load(model_path, "float32")
        litert.predictor()
        keras._predictor, keras.engine = keras.tapped_model(), "keras"  # the same model, held in Keras
        outputs = {}
        for engine, model in (("litert", litert), ("keras", keras)):
            predict_files(model, files[:64])  # warm-up: graph tracing, thread pools
            start = time.perf_counter()
            outputs[engine] = predict_files(model, files).probabilities
            seconds = time.perf_counter() - start
            print(f"predict_files after start-up, {engine:6}     {seconds:7.1f} s  {len(files) / seconds:6.1f} images/s")
        print(f"largest |LiteRT - Keras| probability difference: {np.abs(outputs['litert'] - outputs['keras']).max():.1e}")


if __name__ == "__main__":
    main()
