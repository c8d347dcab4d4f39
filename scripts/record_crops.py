"""Record what `procrop crop --json` answers with the shipped model, for the regression test
`tests/procrop/test_recorded_crops.py`: the demo photos and 50 FCDB photos, free crops and crops
at fixed ratios. Re-run it only when the shipped model changes on purpose:

    .venv/bin/python scripts/record_crops.py
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "procrop" / "data" / "recorded_crops.json"
FCDB = ROOT.parent / "shared" / "data" / "fcdb" / "train"
REQUESTS = {"free": ["-n", "5"], "ratios": ["-n", "2", "-a", "16:9", "-a", "1:1", "-a", "4:5"]}


def photos() -> list[Path]:
    import skimage

    from procrop.demo import SAMPLES

    samples = [Path(skimage.__file__).parent / "data" / name for name in SAMPLES]
    fcdb = sorted(p for p in FCDB.iterdir() if p.suffix == ".jpg")[::27][:50]
    return samples + fcdb


def model_digest() -> str:
    """The weights, the int8 graph `procrop crop` runs (services/cropper/runtime.py) and the
    config (its post-processing: `transfer_weight`, `transfer_k`)."""
    bundle = ROOT / "procrop" / "models" / "lite"
    digest = hashlib.sha256()
    for name in ("model.safetensors", "model.int8.onnx", "config.json"):
        digest.update(hashlib.sha256((bundle / name).read_bytes()).digest())
    return digest.hexdigest()


def crop_lines(paths: list[Path], args: list[str]) -> list[str]:
    """The stdout lines of `procrop crop --json`, image paths replaced by their file names."""
    command = [str(ROOT / ".venv" / "bin" / "procrop"), "crop", "--json", *args, *map(str, paths)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    lines = []
    for line in done.stdout.splitlines():
        record = json.loads(line)
        record["image"] = Path(record["image"]).name
        lines.append(json.dumps(record))
    return lines


def main() -> None:
    paths = photos()
    record = {
        "model_sha256": model_digest(),
        "photos": [p.name for p in paths],
        "requests": REQUESTS,
        "outputs": {name: crop_lines(paths, args) for name, args in REQUESTS.items()},
    }
    OUT.write_text(json.dumps(record, indent=1) + "\n")
    print(f"recorded {len(paths)} photos x {len(REQUESTS)} requests to {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
