"""ONNX Runtime's side of `kd-export`'s check (the Rust side compares the logits).

    python ort_check.py MODEL.onnx IMAGES.safetensors OUT.safetensors THREADS

Validates the model with onnx.checker (full check), runs it with ONNX Runtime on the CPU with
THREADS threads over IMAGES' `pixels` (float32 [N, C, H, W], 0-255) in batches of 256, writes
every output as `logits.<head>` to OUT, and prints one JSON line: versions, the wall time of the
batch-256 pass, and the median latency of one image at batch 1 (200 runs over the images,
after 10 warm-ups).
"""

import json
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from safetensors.numpy import load_file, save_file


def session(path, threads):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def main():
    model_path, images_path, out_path, threads = sys.argv[1:5]
    onnx.checker.check_model(onnx.load(model_path), full_check=True)
    sess = session(model_path, int(threads))
    pixels = load_file(images_path)["pixels"]
    names = [o.name for o in sess.get_outputs()]
    sess.run(names, {"pixels": pixels[:256]})  # warm-up
    outputs = {n: [] for n in names}
    start = time.perf_counter()
    for i in range(0, len(pixels), 256):
        for n, y in zip(names, sess.run(names, {"pixels": pixels[i : i + 256]})):
            outputs[n].append(y)
    seconds = time.perf_counter() - start
    single = []
    for i in range(210):
        j = i % len(pixels)
        t0 = time.perf_counter()
        sess.run(names, {"pixels": pixels[j : j + 1]})
        if i >= 10:
            single.append(time.perf_counter() - t0)
    save_file({f"logits.{n}": np.ascontiguousarray(np.concatenate(v)) for n, v in outputs.items()}, out_path)
    print(
        json.dumps(
            {
                "onnx": onnx.__version__,
                "onnxruntime": ort.__version__,
                "images": int(len(pixels)),
                "batch256_seconds": seconds,
                "batch1_median_ms": 1000.0 * float(np.median(single)),
            }
        )
    )


if __name__ == "__main__":
    main()
