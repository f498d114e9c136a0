"""Tiny, deterministic ONNX stand-ins for InsightFace's ``buffalo_l`` and ``inswapper_128``.

They have the real input/output shapes, so InsightFace's own model router (``model_zoo``)
accepts them as SCRFD, ArcFace and INSwapper, and the pipeline runs its real loading code on
them. Their outputs depend on the picture:

- the detector (``det_10g.onnx``, SCRFD with 9 outputs: scores, boxes and 5 key points at
  strides 8/16/32, dynamic input) calls every bright blob a face: cells of 8×8 pixels whose
  mean is brighter than mid-grey form a mask; the chessboard distance to the mask's edge
  (13 erosions) peaks once per blob, at its centre, where one anchor scores 0.9 (a tiny
  bottom-right ramp breaks ties). A blob must span about 3×3 cells of the 640×640 detector
  input. Box and key points scale with that distance. So a bright square on a dark picture is
  one face, three squares are three faces, and a dark picture has none.
- the recognizer (``w600k_r50.onnx``, 112×112) embeds the mean colour of each quadrant of the
  aligned crop (a fixed 12→512 projection plus a bias, never zero).
- the swapper (``inswapper_128.onnx``, inputs ``target`` 1×3×128×128 and ``source`` 1×512,
  with the ``emap`` 512×512 initializer last) blends the crop half-and-half with a colour
  computed from the source latent: the swapped face's colour depends on the source face.

Everything is built with the ``onnx`` helper API from fixed seeds: the same bytes every time.
"""

from __future__ import annotations

import contextlib
import io
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8

BUFFALO_DEST = "insightface/models/buffalo_l"
INSWAPPER_DEST = "insightface/models/inswapper_128.onnx"
BUFFALO_FILES = ("1k3d68.onnx", "2d106det.onnx", "det_10g.onnx", "genderage.onnx", "w600k_r50.onnx")

#: ArcFace's 5-point template (112×112), relative to the centre, in units of the half-size.
_KPS_OFFSETS = (
    np.array(
        [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
        dtype=np.float32,
    )
    - 56.0
) / 56.0


def _model(graph: onnx.GraphProto) -> bytes:
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="volume-worker-tests"
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(value), name)


def detector() -> bytes:
    """SCRFD-shaped detector (9 outputs, dynamic H×W) that finds bright blobs."""
    nodes: list[onnx.NodeProto] = []
    inits = [
        _const("zero", np.array(0.0, dtype=np.float32)),
        _const("one", np.array(1.0, dtype=np.float32)),
        _const("eps", np.array(1e-3, dtype=np.float32)),
        _const("score_scale", np.array(0.9, dtype=np.float32)),
        _const("axis2", np.array(2, dtype=np.int64)),
        _const("axis3", np.array(3, dtype=np.int64)),
        _const("col", np.array([-1, 1], dtype=np.int64)),
        _const("rows4", np.array([-1, 4], dtype=np.int64)),
        _const("rows10", np.array([-1, 10], dtype=np.int64)),
        _const("ones4", np.ones((1, 4), dtype=np.float32)),
        _const("zeros4", np.zeros((1, 4), dtype=np.float32)),
        _const("zeros10", np.zeros((1, 10), dtype=np.float32)),
        _const("kps_tpl", _KPS_OFFSETS.reshape(1, 10)),
    ]
    n = helper.make_node
    nodes.append(n("ReduceMean", ["input.1"], ["bright"], axes=[1], keepdims=1, name="brightness"))
    nodes.append(n("AveragePool", ["bright"], ["cell"], kernel_shape=[8, 8], strides=[8, 8], name="cells"))
    nodes.append(n("Greater", ["cell", "zero"], ["mask_b"], name="is_bright"))
    nodes.append(n("Cast", ["mask_b"], ["e0"], to=TensorProto.FLOAT, name="mask"))
    erosions = ["e0"]
    for k in range(13):
        prev, neg, pooled, out = erosions[-1], f"neg{k}", f"pool{k}", f"e{k + 1}"
        nodes.append(n("Neg", [prev], [neg], name=f"negate{k}"))
        nodes.append(
            n(
                "MaxPool",
                [neg],
                [pooled],
                kernel_shape=[3, 3],
                pads=[1, 1, 1, 1],
                strides=[1, 1],
                name=f"erode{k}",
            )
        )
        nodes.append(n("Neg", [pooled], [out], name=f"eroded{k}"))
        erosions.append(out)
    nodes.append(n("Sum", erosions, ["dist"], name="distance"))
    # Tie-breaker: a tiny ramp towards the bottom right, so a plateau has one maximum.
    nodes.append(n("Mul", ["e0", "zero"], ["zeros_grid"], name="zeros_like"))
    nodes.append(n("Add", ["zeros_grid", "one"], ["ones_grid"], name="ones_like"))
    nodes.append(n("CumSum", ["ones_grid", "axis3"], ["ramp_x"], name="ramp_x"))
    nodes.append(n("CumSum", ["ones_grid", "axis2"], ["ramp_y"], name="ramp_y"))
    nodes.append(n("Add", ["ramp_x", "ramp_y"], ["ramp_xy"], name="ramp"))
    nodes.append(n("Mul", ["ramp_xy", "eps"], ["ramp_small"], name="ramp_scaled"))
    nodes.append(n("Add", ["dist", "ramp_small"], ["ranked"], name="ranked"))
    nodes.append(
        n(
            "MaxPool",
            ["ranked"],
            ["ranked_max"],
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
            strides=[1, 1],
            name="peak",
        )
    )
    nodes.append(n("GreaterOrEqual", ["ranked", "ranked_max"], ["is_peak_b"], name="is_peak"))
    nodes.append(n("Cast", ["is_peak_b"], ["is_peak"], to=TensorProto.FLOAT, name="peak_f"))
    nodes.append(n("Sub", ["dist", "one"], ["dist_m1"], name="dist_minus_one"))
    nodes.append(n("Clip", ["dist_m1", "zero", "one"], ["strength"], name="strength"))
    nodes.append(n("Mul", ["is_peak", "strength"], ["score_raw"], name="score_raw"))
    nodes.append(n("Mul", ["score_raw", "score_scale"], ["score_grid"], name="score_grid"))

    def per_anchor(src: str, width: int, prefix: str) -> str:
        """[1,1,h,w] grid (or [h*w, width] rows) → rows for 2 anchors per location."""
        rows = f"{prefix}_rows"
        nodes.append(
            n("Reshape", [src, {1: "col", 4: "rows4", 10: "rows10"}[width]], [rows], name=f"{prefix}_reshape")
        )
        both = f"{prefix}_both"
        nodes.append(n("Concat", [rows, rows], [both], axis=1, name=f"{prefix}_dup"))
        out = f"{prefix}_out"
        nodes.append(
            n("Reshape", [both, {1: "col", 4: "rows4", 10: "rows10"}[width]], [out], name=f"{prefix}_anchors")
        )
        return out

    # stride 8: scores (second anchor always 0), boxes and key points from the distance.
    nodes.append(n("Reshape", ["score_grid", "col"], ["s8_rows"], name="s8_reshape"))
    nodes.append(n("Mul", ["s8_rows", "zero"], ["s8_zero"], name="s8_zero"))
    nodes.append(n("Concat", ["s8_rows", "s8_zero"], ["s8_pair"], axis=1, name="s8_pair"))
    nodes.append(n("Reshape", ["s8_pair", "col"], ["score_8"], name="score_8"))
    nodes.append(n("Reshape", ["dist", "col"], ["d_rows"], name="d_rows"))
    nodes.append(n("MatMul", ["d_rows", "ones4"], ["b8"], name="b8"))
    nodes.append(n("MatMul", ["d_rows", "kps_tpl"], ["k8"], name="k8"))
    b8 = per_anchor("b8", 4, "bbox8")
    k8 = per_anchor("k8", 10, "kps8")
    nodes.append(n("Identity", [b8], ["bbox_8"], name="bbox_8"))
    nodes.append(n("Identity", [k8], ["kps_8"], name="kps_8"))
    # strides 16 and 32: nothing there, with the right number of rows.
    for stride in (16, 32):
        g = f"g{stride}"
        nodes.append(
            n(
                "AveragePool",
                ["bright"],
                [f"{g}_pool"],
                kernel_shape=[stride, stride],
                strides=[stride, stride],
                name=f"{g}_pool",
            )
        )
        nodes.append(n("Mul", [f"{g}_pool", "zero"], [f"{g}_zero"], name=f"{g}_zero"))
        nodes.append(n("Reshape", [f"{g}_zero", "col"], [f"{g}_rows"], name=f"{g}_rows"))
        s = per_anchor(f"{g}_rows", 1, f"score{stride}")
        nodes.append(n("Identity", [s], [f"score_{stride}"], name=f"score_{stride}"))
        nodes.append(n("MatMul", [f"{g}_rows", "zeros4"], [f"{g}_b"], name=f"{g}_b"))
        b = per_anchor(f"{g}_b", 4, f"bbox{stride}")
        nodes.append(n("Identity", [b], [f"bbox_{stride}"], name=f"bbox_{stride}"))
        nodes.append(n("MatMul", [f"{g}_rows", "zeros10"], [f"{g}_k"], name=f"{g}_k"))
        k = per_anchor(f"{g}_k", 10, f"kps{stride}")
        nodes.append(n("Identity", [k], [f"kps_{stride}"], name=f"kps_{stride}"))

    inputs = [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])]
    outputs = []
    for kind, width in (("score", 1), ("bbox", 4), ("kps", 10)):
        for stride in (8, 16, 32):
            outputs.append(
                helper.make_tensor_value_info(f"{kind}_{stride}", TensorProto.FLOAT, [f"n{stride}", width])
            )
    return _model(helper.make_graph(nodes, "fixture_scrfd", inputs, outputs, inits))


def _pooled_linear(
    name: str, size: int, pool: int, out_dim: int, seed: int, *, batch: str | int = "None"
) -> bytes:
    """input [N,3,size,size] → mean colour of pool×pool regions → a fixed linear map → [N,out_dim]."""
    rng = np.random.default_rng(seed)
    cells = (size // pool) ** 2 * 3
    weight = rng.standard_normal((cells, out_dim)).astype(np.float32)
    bias = (rng.standard_normal(out_dim).astype(np.float32) + 0.5).astype(np.float32)
    n = helper.make_node
    nodes = [
        n(
            "AveragePool",
            ["input.1"],
            ["pooled"],
            kernel_shape=[pool, pool],
            strides=[pool, pool],
            name="pool",
        ),
        n("Flatten", ["pooled"], ["flat"], axis=1, name="flatten"),
        n("MatMul", ["flat", "weight"], ["proj"], name="project"),
        n("Add", ["proj", "bias"], ["output"], name="bias_add"),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, out_dim])],
        [_const("weight", weight), _const("bias", bias)],
    )
    return _model(graph)


def recognizer() -> bytes:
    """ArcFace-shaped recognizer: 112×112 → 512, from the mean colour of each quadrant."""
    return _pooled_linear("fixture_arcface", 112, 56, 512, seed=112)


def landmark_3d() -> bytes:
    """``1k3d68``-shaped (192×192 → 3309): routed as a landmark model, never loaded by the pipeline."""
    return _pooled_linear("fixture_1k3d68", 192, 96, 3309, seed=68, batch=1)


def landmark_2d() -> bytes:
    """``2d106det``-shaped (192×192 → 212)."""
    return _pooled_linear("fixture_2d106det", 192, 96, 212, seed=106, batch=1)


def genderage() -> bytes:
    """``genderage``-shaped (96×96 → 3)."""
    return _pooled_linear("fixture_genderage", 96, 48, 3, seed=96, batch=1)


def swapper() -> bytes:
    """INSwapper-shaped: ``target`` 1×3×128×128 and ``source`` 1×512 → 1×3×128×128, ``emap`` last."""
    rng = np.random.default_rng(128)
    to_colour = (rng.standard_normal((512, 3)) * 0.2).astype(np.float32)
    emap = (np.eye(512) + rng.standard_normal((512, 512)) * 0.01).astype(np.float32)
    n = helper.make_node
    nodes = [
        n("MatMul", ["source", "to_colour"], ["colour_logits"], name="colour"),
        n("Mul", ["colour_logits", "gain"], ["colour_scaled"], name="gain"),
        n("Sigmoid", ["colour_scaled"], ["colour_01"], name="squash"),
        n("Reshape", ["colour_01", "colour_shape"], ["colour_map"], name="as_map"),
        n("Mul", ["target", "half"], ["target_half"], name="target_half"),
        n("Mul", ["colour_map", "half"], ["colour_half"], name="colour_half"),
        n("Add", ["target_half", "colour_half"], ["output"], name="blend"),
    ]
    inits = [
        _const("to_colour", to_colour),
        _const("gain", np.array(8.0, dtype=np.float32)),
        _const("half", np.array(0.5, dtype=np.float32)),
        _const("colour_shape", np.array([1, 3, 1, 1], dtype=np.int64)),
        _const("emap", emap),  # INSwapper reads graph.initializer[-1] as emap
    ]
    graph = helper.make_graph(
        nodes,
        "fixture_inswapper",
        [
            helper.make_tensor_value_info("target", TensorProto.FLOAT, [1, 3, 128, 128]),
            helper.make_tensor_value_info("source", TensorProto.FLOAT, [1, 512]),
        ],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 128, 128])],
        inits,
    )
    return _model(graph)


def buffalo_files() -> dict[str, bytes]:
    """The five files of ``buffalo_l``, by their real names."""
    return {
        "1k3d68.onnx": landmark_3d(),
        "2d106det.onnx": landmark_2d(),
        "det_10g.onnx": detector(),
        "genderage.onnx": genderage(),
        "w600k_r50.onnx": recognizer(),
    }


def buffalo_zip() -> bytes:
    """``buffalo_l.zip`` as InsightFace publishes it: the five files at the top level."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in sorted(buffalo_files().items()):
            info = zipfile.ZipInfo(name, date_time=(2021, 5, 4, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return buf.getvalue()


def write_models_dir(root: Path) -> dict[str, str]:
    """Lay the models out under ``root`` by manifest dest; return dest → absolute path (a plan's ``models``)."""
    buffalo = root / BUFFALO_DEST
    buffalo.mkdir(parents=True, exist_ok=True)
    for name, data in buffalo_files().items():
        (buffalo / name).write_bytes(data)
    swap = root / INSWAPPER_DEST
    swap.write_bytes(swapper())
    return {BUFFALO_DEST: str(buffalo), INSWAPPER_DEST: str(swap)}


# -- pictures and a loopback image server for the face-swap tests -------------------------------

FACE_COLOURS = ((250, 200, 0), (0, 220, 250), (240, 240, 240), (200, 90, 250))


def picture(width: int, height: int, faces: list[tuple[int, int, int]], *, seed: int = 0) -> np.ndarray:
    """An RGB picture: dark noise, plus one bright square per ``(x, y, side)`` (a fixture 'face')."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 40, size=(height, width, 3), dtype=np.uint8)
    for i, (x, y, side) in enumerate(faces):
        img[y : y + side, x : x + side] = FACE_COLOURS[i % len(FACE_COLOURS)]
    return img


def encode(img: np.ndarray, fmt: str = "PNG", **save: object) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, fmt, **save)
    return buf.getvalue()


def b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode("ascii")


class ImageServer:
    """An ``http.server`` on 127.0.0.1 answering from a table: path → (status, headers, body).

    A body may be a callable writing to the handler itself (slow or endless answers).
    """

    def __init__(self) -> None:
        import http.server
        import threading

        self.routes: dict[str, tuple[int, dict[str, str], object]] = {}
        self.hits: list[str] = []
        routes, hits = self.routes, self.hits

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hits.append(self.path)
                status, headers, body = routes.get(self.path, (404, {}, b"not found"))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if callable(body):
                    self.end_headers()
                    with contextlib.suppress(OSError):
                        body(self)
                    return
                assert isinstance(body, bytes)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                with contextlib.suppress(OSError):
                    self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def add(self, path: str, body: object, status: int = 200, headers: dict[str, str] | None = None) -> str:
        self.routes[path] = (status, headers or {"Content-Type": "image/png"}, body)
        return self.url(path)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
