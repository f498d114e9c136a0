"""A weights mirror for `bootstrap timing` where the real sources are out of reach.

Writes, under DIR and by manifest ``dest``, stand-ins for the face-swap manifest's files
(``insightface/models/buffalo_l.zip`` and ``insightface/models/inswapper_128.onnx``): the test
suite's fixture ONNX models (real input/output shapes, so the pipeline really loads and runs
them), each padded with an unused random initializer to the size of the real file, so the
weights phase moves as many bytes as it would with the real models. Then serve DIR on loopback
and point the boots at it:

    python -m uv run python benchmarks/timing_mirror.py /tmp/mirror
    python -m uv run python -m tests.httpserver /tmp/mirror --port 8089 &
    python -m uv run bootstrap timing cold warm recover baseline --extras faceswap \\
        --mirror http://127.0.0.1:8089 --out timing

``--small`` skips the padding (the fixtures are a few MB).
"""

from __future__ import annotations

import argparse
import io
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests import fixture_models as fx  # noqa: E402

#: Sizes of the real files (bytes), as their sources serve them.
REAL_SIZES = {
    "1k3d68.onnx": 143_607_619,
    "2d106det.onnx": 5_030_888,
    "det_10g.onnx": 16_923_827,
    "genderage.onnx": 1_322_532,
    "w600k_r50.onnx": 174_383_860,
    "inswapper_128.onnx": 554_253_681,
}


def padded(model_bytes: bytes, size: int, seed: int) -> bytes:
    """The model with an unused float initializer first, bringing it to about ``size`` bytes."""
    missing = size - len(model_bytes)
    if missing <= 64:
        return model_bytes
    model = onnx.load_from_string(model_bytes)
    pad = np.random.default_rng(seed).standard_normal(missing // 4).astype(np.float32)
    # First, never last: INSwapper reads the last initializer as its emap.
    model.graph.initializer.insert(0, numpy_helper.from_array(pad, "timing_pad"))
    return model.SerializeToString()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--small", action="store_true", help="the fixtures as they are, unpadded")
    args = ap.parse_args()
    models = args.dir / "insightface" / "models"
    models.mkdir(parents=True, exist_ok=True)
    files = fx.buffalo_files()
    if not args.small:
        files = {n: padded(b, REAL_SIZES[n], seed=i) for i, (n, b) in enumerate(sorted(files.items()))}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, data in sorted(files.items()):
            zf.writestr(zipfile.ZipInfo(name, date_time=(2021, 5, 4, 0, 0, 0)), data, zipfile.ZIP_DEFLATED)
    (models / "buffalo_l.zip").write_bytes(buf.getvalue())
    swap = fx.swapper()
    if not args.small:
        swap = padded(swap, REAL_SIZES["inswapper_128.onnx"], seed=99)
    (models / "inswapper_128.onnx").write_bytes(swap)
    for p in sorted(models.iterdir()):
        print(f"{p.stat().st_size:>12,d}  {p}")


if __name__ == "__main__":
    main()
