"""One saved model, the same images, every CPU engine and precision: speed, agreement with Keras, and AUC.

    .venv/bin/python benchmarks/bench_engines.py --run outputs [--images 2000] [--engines ...]

For the model in RUN/models and its RUN/reports/splits.csv, in one run on this machine:
- engines: Keras (the reference), LiteRT float32 (what cxr runs today) and int8 (`litert.to_int8_flatbuffer`,
  what `cxr export --format tflite-int8` writes), ONNX Runtime float32 (cxr's ONNX export) and int8 (static QDQ,
  int8 weights per channel, `reduce_range` on CPUs without VNNI), OpenVINO float32 (inference precision f32
  forced: on CPUs with bfloat16 it would otherwise pick bf16), bfloat16 (the hint OpenVINO picks by itself on
  CPUs with AMX or avx512_bf16) and int8 (NNCF post-training quantization).
  Every int8 engine is calibrated on the same 200 seeded training images.
- speed: images/s over `--images` images (the test split, external_dev and validation and training images to
  make up the number), already decoded, at batch 1 (with p50/p95 latency per image) and at the best of
  batches 4, 16 and 32 (probed on 256 images); 2 threads where the engine takes a thread count.
- agreement: max |probability difference| from Keras over the test split and external_dev.
- AUC on the internal test split and on external_dev (../shared/data/chest_xray/external_dev), with a paired
  stratified bootstrap 95 % CI of the difference from LiteRT float32.
The CPU's model name and flags that matter to int8 (avx2, avx512f, avx512_vnni, avx512_bf16, amx) are printed.
The OpenVINO rows need `pip install openvino nncf` (neither is a dependency of cxr).
"""

import argparse
import csv
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

THREADS = len(os.sched_getaffinity(0))
CALIBRATION = 200
ENGINES = ("keras", "litert-fp32", "litert-int8", "onnxruntime-fp32", "onnxruntime-int8", "openvino-fp32",
           "openvino-bf16", "openvino-int8")


def cpu_flags():
    info = Path("/proc/cpuinfo").read_text()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
    return name, {f: f in flags for f in wanted}


def decode_all(paths, size):
    from cxr.data.decode import decode_image

    with ThreadPoolExecutor(THREADS) as pool:
        return np.stack(list(pool.map(lambda p: decode_image(p, size), paths)))


class Engine:
    """A callable on (n, S, S, 3) float32 batches -> (n, classes) probabilities."""

    def __init__(self, name, run):
        self.name, self.run = name, run


def litert_engine(name, flatbuffer):
    from cxr.bundle.litert import _interpreter

    runners = {}

    def run(x):
        if len(x) not in runners:
            interpreter = _interpreter(flatbuffer, THREADS)
            source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
            interpreter.resize_tensor_input(source["index"], list(x.shape))
            interpreter.allocate_tensors()
            runners[len(x)] = (interpreter, source["index"], target["index"])
        interpreter, source, target = runners[len(x)]
        interpreter.set_tensor(source, np.ascontiguousarray(x))
        interpreter.invoke()
        return interpreter.get_tensor(target).copy()

    return Engine(name, run)


def onnxruntime_engine(name, path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    return Engine(name, lambda x: session.run(None, {input_name: x})[0])


def onnx_int8(onnx_path, calibration, folder, vnni):
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quant_pre_process, quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(calibration)

        def get_next(self):
            image = next(self.items, None)
            return None if image is None else {"image": image[None].astype(np.float32)}

    prepared, quantized = folder / "prepared.onnx", folder / "model.int8.onnx"
    quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
    quantize_static(str(prepared), str(quantized), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=not vnni, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return quantized


def openvino_engines(onnx_path, calibration, wanted):
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(onnx_path))
    engines = []

    def engine(name, ov_model, precision="f32"):
        config = {"INFERENCE_NUM_THREADS": THREADS, "INFERENCE_PRECISION_HINT": precision}
        compiled = {}

        def run(x):
            if len(x) not in compiled:  # a static shape per batch size, as OpenVINO runs fastest
                reshaped = ov_model.clone()
                reshaped.reshape([len(x), *x.shape[1:]])
                compiled[len(x)] = core.compile_model(reshaped, "CPU", config).create_infer_request()
            request = compiled[len(x)]
            request.infer({0: x})
            return request.get_output_tensor(0).data.copy()

        return Engine(name, run)

    if "openvino-fp32" in wanted:
        engines.append(engine("openvino-fp32", model))
    if "openvino-bf16" in wanted:
        engines.append(engine("openvino-bf16", model, "bf16"))
    if "openvino-int8" in wanted:
        import nncf

        dataset = nncf.Dataset(list(calibration), lambda image: image[None].astype(np.float32))
        engines.append(engine("openvino-int8", nncf.quantize(model, dataset, subset_size=len(calibration))))
    return engines


def speed(engine, images, batch):
    """(images/s, per-call latencies in ms) over `images` in batches of `batch`."""
    x = images.astype(np.float32)
    engine.run(x[:batch])  # plans, allocates, compiles
    latencies, start = [], time.perf_counter()
    for k in range(0, len(x) - batch + 1, batch):
        t = time.perf_counter()
        engine.run(x[k:k + batch])
        latencies.append((time.perf_counter() - t) * 1000)
    done = len(latencies) * batch
    return done / (time.perf_counter() - start), np.array(latencies)


def probabilities(engine, images, batch=16):
    x = images.astype(np.float32)
    return np.concatenate([engine.run(x[k:k + batch]) for k in range(0, len(x), batch)])


def paired_auc_difference(y, p, reference, n_resamples=2000, seed=0):
    from sklearn.metrics import roc_auc_score

    from cxr.evaluate.metrics import stratified_resamples

    diffs = [roc_auc_score(y[r], p[r]) - roc_auc_score(y[r], reference[r])
             for r in stratified_resamples(y, n_resamples, seed)]
    return roc_auc_score(y, p) - roc_auc_score(y, reference), np.percentile(diffs, [2.5, 97.5])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=ROOT / "outputs")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    args = parser.parse_args()

    from sklearn.metrics import roc_auc_score

    from cxr.bundle import litert
    from cxr.commands.export import export
    from cxr.bundle.saved_model import SavedModel

    name, flags = cpu_flags()
    print(f"CPU: {name}, {THREADS} threads; " + ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in flags.items()))
    model = SavedModel.load(args.run / "models" / "model.h5")
    size, positive = model.img_size, model.positive_index
    with open(args.run / "reports" / "splits.csv") as f:
        rows = list(csv.DictReader(f))
    split = {s: [r for r in rows if r["split"] == s] for s in ("train", "val", "test")}
    external = sorted(p for p in (SHARED / "chest_xray" / "external_dev").glob("*/*") if p.is_file())
    rng = np.random.default_rng(0)
    calibration = decode_all([split["train"][k]["path"] for k in rng.choice(len(split["train"]), CALIBRATION,
                                                                            replace=False)], size)
    test = decode_all([r["path"] for r in split["test"]], size)
    y_test = np.array([r["class"] == model.operating_point["positive_class"] for r in split["test"]])
    ext = decode_all(external, size)
    y_ext = np.array([p.parent.name == model.operating_point["positive_class"] for p in external])
    extra = [r["path"] for r in split["val"] + split["train"]][:max(0, args.images - len(test) - len(ext))]
    timed = np.concatenate([test, ext, *([decode_all(extra, size)] if extra else [])])[:args.images]
    print(f"model {args.run / 'models' / 'model.h5'} ({model.backbone}, {size} px, test-time scales "
          f"{model.test_time_scales}); {len(timed)} images timed; AUC on {len(test)} test and {len(ext)} external_dev "
          f"images; int8 calibrated on {CALIBRATION} training images")

    engines = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        keras_model = model.keras_model  # Keras and LiteRT float32 always run: the references
        engines["keras"] = Engine("keras", lambda x: keras_model.predict_on_batch(x))
        engines["litert-fp32"] = litert_engine("litert-fp32", litert.to_flatbuffer(keras_model))
        if "litert-int8" in args.engines:
            start = time.perf_counter()
            flatbuffer = litert.to_int8_flatbuffer(model.keras_model, calibration)
            print(f"litert-int8: converted in {time.perf_counter() - start:.0f} s")
            engines["litert-int8"] = litert_engine("litert-int8", flatbuffer)
        if {e for e in ENGINES if e.startswith(("onnxruntime", "openvino"))} & set(args.engines):
            onnx_path = next(p for p in export(args.run / "models" / "model.h5", ["onnx"], folder / "onnx")
                             if p.suffix == ".onnx")
            if "onnxruntime-fp32" in args.engines:
                engines["onnxruntime-fp32"] = onnxruntime_engine("onnxruntime-fp32", onnx_path)
            if "onnxruntime-int8" in args.engines:
                start = time.perf_counter()
                quantized = onnx_int8(onnx_path, calibration, folder, flags["avx512_vnni"] or flags["avx_vnni"])
                print(f"onnxruntime-int8: quantized in {time.perf_counter() - start:.0f} s")
                engines["onnxruntime-int8"] = onnxruntime_engine("onnxruntime-int8", quantized)
            for engine in openvino_engines(onnx_path, calibration, set(args.engines)):
                engines[engine.name] = engine

        outputs = {n: (probabilities(e, test)[:, positive], probabilities(e, ext)[:, positive])
                   for n, e in engines.items()}
        print("| engine | images/s batch 1 | p50 / p95 ms | best batch | images/s | max abs dp vs Keras | test AUC "
              "(diff, 95 % CI) | external_dev AUC (diff, 95 % CI) |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for n in [e for e in ENGINES if e in engines and e in args.engines]:
            one, latencies = speed(engines[n], timed, 1)
            probes = {b: speed(engines[n], timed[:256], b)[0] for b in (4, 16, 32)}
            best = max(probes, key=probes.get)
            rate = speed(engines[n], timed, best)[0]
            pt, pe = outputs[n]
            gap = max(np.abs(pt - outputs["keras"][0]).max(), np.abs(pe - outputs["keras"][1]).max())
            cells = []
            for y, p, ref in ((y_test, pt, outputs["litert-fp32"][0]), (y_ext, pe, outputs["litert-fp32"][1])):
                diff, (low, high) = paired_auc_difference(y, p, ref)
                cells.append(f"{roc_auc_score(y, p):.4f} ({diff:+.4f}, {low:+.4f} to {high:+.4f})")
            print(f"| {n} | {one:.1f} | {np.percentile(latencies, 50):.1f} / {np.percentile(latencies, 95):.1f} | {best} "
                  f"| {rate:.1f} | {gap:.4f} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
