"""The shipped crop network's int8 graph against its float graph, side by side in one run.

    .venv/bin/python -m benchmarks.bench_int8 [--photos 330] [--fcdb PATH]

Fidelity: every 4th FCDB train photo (by name, up to --photos) is prepared once (decode, encoder,
neighbours) and cropped by both graphs exactly as `procrop crop` runs them (float: 4 photos a
run; int8: one photo a run); reported: the IoU of the two top-1 crops (mean, 5th percentile,
minimum) and each top-1's IoU with the expert crop, with the paired difference and its standard
error. The shipped model was trained on these photos, so the expert IoUs are not a quality
figure: only their difference means something. Speed: the network alone on one core, the same
inputs, milliseconds per photo (median of 7 passes over 64 photos).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from benchmarks.common import FCDB, emit
from services.cropper.postprocess import CropRequest
from services.cropper.predictor import build_predictor
from services.cropper.runtime import INT8_FILE, ONNX_FILE, OnnxRunner, example_arrays
from shared.annotations import load_fcdb
from shared.boxes import box_iou, denormalize_xyxy
from shared.checkpoints import shipped_bundle
from shared.images import content_hash, decode_image, read_bytes
from shared.settings import load_settings


def ms_per_photo(runner: OnnxRunner, arrays: dict[str, np.ndarray], passes: int = 7) -> float:
    runner(arrays)
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        runner(arrays)
        times.append(time.perf_counter() - start)
    return round(float(np.median(times)) / len(arrays["aspect"]) * 1000, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fcdb", type=Path, default=FCDB)
    parser.add_argument("--photos", type=int, default=330)
    args = parser.parse_args()
    bundle = shipped_bundle()
    predictor = build_predictor(load_settings())
    graphs = {
        "float": OnnxRunner(bundle / ONNX_FILE, predictor.config),
        "int8": OnnxRunner(bundle / INT8_FILE, predictor.config, chunk=1),
    }
    annotations = load_fcdb(args.fcdb / "annotations.json")
    names = sorted(annotations)[::4][: args.photos]
    request = CropRequest.parse(n=3)
    top1: dict[str, list[tuple[int, int, int, int]]] = {name: [] for name in graphs}
    experts: list[np.ndarray] = []
    for start in range(0, len(names), 16):
        chunk = names[start : start + 16]
        data = [read_bytes(str(args.fcdb / name)) for name in chunk]
        images = [decode_image(d, name) for d, name in zip(data, chunk, strict=True)]
        prepared = predictor.prepare(images, [content_hash(d) for d in data])
        for name, runner in graphs.items():
            predictor.runner = runner
            top1[name] += [r.crops[0].box for r in predictor.crop_prepared(prepared, request)]
        experts += [
            denormalize_xyxy(np.asarray(annotations[n].crops_norm[0]), *im.size)
            for n, im in zip(chunk, images, strict=True)
        ]
    expert = np.stack(experts)
    boxes = {name: np.asarray(top1[name], np.float64) for name in graphs}
    agree = np.diag(box_iou(boxes["float"], boxes["int8"]))
    quality = {name: np.diag(box_iou(boxes[name], expert)) for name in graphs}
    diff = quality["int8"] - quality["float"]
    speed_inputs = example_arrays(predictor.config, batch=64)
    emit(
        "bench_int8",
        {
            "photos": len(names),
            "top1_iou_float_vs_int8": {
                "mean": round(float(agree.mean()), 4),
                "p5": round(float(np.percentile(agree, 5)), 4),
                "min": round(float(agree.min()), 4),
                "identical_boxes": int((boxes["float"] == boxes["int8"]).all(1).sum()),
            },
            "expert_iou": {name: round(float(q.mean()), 4) for name, q in quality.items()},
            "expert_iou_int8_minus_float": {
                "mean": round(float(diff.mean()), 5),
                "stderr": round(float(diff.std(ddof=1) / np.sqrt(len(diff))), 5),
            },
            "network_ms_per_photo_one_core": {
                name: ms_per_photo(runner, speed_inputs) for name, runner in graphs.items()
            },
            "graph_mb": {
                name: round((bundle / f).stat().st_size / 1e6, 2)
                for name, f in (("float", ONNX_FILE), ("int8", INT8_FILE))
            },
        },
    )


if __name__ == "__main__":
    main()
