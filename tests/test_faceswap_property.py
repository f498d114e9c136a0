"""Hostile and malformed inputs thrown at the handler: every answer is structured, and the worker
keeps serving (SPEC §10: the worker never dies on a bad job).

Inputs mix random JSON, near-valid jobs with wrong types, broken base64, corrupted pictures and
URLs to a loopback server that answers with garbage, errors, redirect loops and lies about its
length. Hosts other than the loopback server's name never reach DNS (an injected resolver).
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bootstrap.plan import Capability, Plan
from bootstrap.settings import Settings
from bootstrap.timeline import Timeline
from tests.fixture_models import ImageServer, b64, encode, picture, write_models_dir
from worker import fetch as wfetch
from worker.errors import JOB_CODES
from worker.handler import Worker
from worker.lifecycle import Lifecycle, State
from worker.pipelines import faceswap
from worker.pipelines.base import LoadContext

HOST = "img.test"
GOOD_SOURCE = b64(encode(picture(160, 160, [(40, 40, 80)])))
GOOD_TARGET = b64(encode(picture(200, 160, [(60, 40, 80)])))
PNG = encode(picture(64, 64, [(10, 10, 40)]))


@pytest.fixture(scope="module")
def server() -> Iterator[ImageServer]:
    srv = ImageServer()
    srv.add("/ok.png", PNG)
    srv.add("/garbage", b"\x00\x01garbage" * 50)
    srv.add("/half.png", PNG[: len(PNG) // 2])
    srv.add("/err", b"no", status=500)
    srv.add("/loop", b"", status=302, headers={"Location": "/loop"})
    srv.add("/to-metadata", b"", status=302, headers={"Location": "http://169.254.169.254/"})
    srv.add("/to-file", b"", status=301, headers={"Location": "file:///etc/passwd"})
    srv.add("/no-location", b"", status=302, headers={})
    srv.add("/liar", b"short", headers={"Content-Type": "image/png", "Content-Length": "999999999"})
    srv.add("/html", b"<html>sign in</html>", headers={"Content-Type": "text/html"})
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory, server: ImageServer) -> Worker:
    models = write_models_dir(tmp_path_factory.mktemp("models"))
    settings = Settings.from_env({"WORKER_MAX_INPUT_MB": "1", "WORKER_MAX_PIXELS": "4000000"})
    pipe = faceswap.load(LoadContext(settings=settings, models=models, extra={"fetch_timeout_s": 2}))

    def resolve(host: str, port: int) -> list[str]:
        if host == HOST:
            return ["127.0.0.1"]
        if host.replace(".", "").isdigit() or ":" in host:
            return wfetch._default_resolve(host, port)  # literal addresses: no DNS involved
        raise OSError("no DNS in this test")

    pipe.policy = dataclasses.replace(pipe.policy, resolve=resolve, is_public=lambda a: a == "127.0.0.1")
    w = Worker(
        plan=Plan(worker_id="p", volume="/x", app_dir="."),
        timeline=Timeline("p", stream=io.StringIO()),
        lifecycle=Lifecycle(),
    )
    w.pipelines["faceswap"] = pipe
    w.capabilities["faceswap"] = Capability()
    w.lifecycle.to(State.WARM)
    w.lifecycle.to(State.READY)
    return w


json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=40)
)
json_value = st.recursive(
    json_leaf,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
    max_leaves=12,
)


def _urls(port: int) -> st.SearchStrategy[str]:
    paths = st.sampled_from(
        [
            "/ok.png",
            "/garbage",
            "/half.png",
            "/err",
            "/loop",
            "/to-metadata",
            "/to-file",
            "/no-location",
            "/liar",
            "/html",
            "/missing",
        ]
    )
    hosts = st.sampled_from(
        [
            f"{HOST}:{port}",
            f"127.0.0.1:{port}",
            "169.254.169.254",
            "[::1]",
            "10.0.0.1",
            "unknown.invalid",
            f"{HOST}:1",
        ]
    )
    schemes = st.sampled_from(["http", "https", "ftp", "file", "", "HTTP"])
    return st.one_of(
        st.builds(lambda s, h, p: f"{s}://{h}{p}", schemes, hosts, paths),
        st.text(max_size=60),
    )


def _odd_image(w: int, h: int, value: int, mode: str) -> bytes:
    from PIL import Image

    img = Image.new("RGB", (w, h), (value, value, value)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, "TIFF" if mode in ("CMYK", "I;16") else "PNG")
    return buf.getvalue()


def _images() -> st.SearchStrategy[str]:
    def corrupt(data: bytes, cut: int, flip: int) -> str:
        raw = bytearray(data[: max(1, cut)])
        raw[flip % len(raw)] ^= 0xFF
        return b64(bytes(raw))

    return st.one_of(
        st.just(GOOD_SOURCE),
        st.just("data:image/png;base64," + GOOD_TARGET),
        st.builds(corrupt, st.just(PNG), st.integers(0, len(PNG)), st.integers(0, 10_000)),
        st.binary(max_size=200).map(b64),
        st.text(max_size=80),
        st.just("A" * 2_000_000),  # over the 1 MB limit
        # odd shapes and modes: thin strips, single pixels, grey, alpha, bright or dark
        st.builds(
            lambda w, h, v, mode: b64(_odd_image(w, h, v, mode)),
            st.integers(1, 3000),
            st.integers(1, 4),
            st.integers(0, 255),
            st.sampled_from(["RGB", "L", "RGBA", "P", "I;16", "CMYK"]),
        ),
        st.builds(
            lambda w, h, v, mode: b64(_odd_image(w, h, v, mode)),
            st.integers(1, 64),
            st.integers(1, 64),
            st.integers(0, 255),
            st.sampled_from(["RGB", "LA", "1"]),
        ),
    )


def _field_values(port: int) -> dict[str, st.SearchStrategy[Any]]:
    return {
        "source_url": _urls(port) | json_value,
        "target_url": _urls(port) | json_value,
        "source_image": _images() | json_value,
        "target_image": _images() | json_value,
        "source_index": st.integers(-3, 5) | json_value,
        "target_index": st.integers(-3, 5) | json_value,
        "output_format": st.sampled_from(["png", "jpeg", "webp", "gif", "PNG", ""]) | json_value,
        "output": st.sampled_from(["base64", "s3", "disk"]) | json_value,
        "max_side": st.integers(-10, 5000) | json_value,
        "s3": st.fixed_dictionaries({}, optional={"bucket": st.text(max_size=8), "prefix": json_value})
        | json_value,
        "task": st.sampled_from(["faceswap", "health", "paint"]) | json_value,
    }


@st.composite
def hostile_jobs(draw: st.DrawFn, port: int) -> Any:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(json_value)  # the whole job is anything
    fields = _field_values(port)
    job_input: dict[str, Any] = {}
    if kind <= 3:  # any fields with any values
        for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=6, unique=True)):
            job_input[name] = draw(fields[name])
    elif kind <= 6:  # a hostile URL, the rest valid
        job_input = {"source_url": draw(_urls(port)), "target_image": GOOD_TARGET}
    else:  # a hostile picture, the rest valid
        job_input = {"source_image": GOOD_SOURCE, "target_image": draw(_images())}
    if kind >= 4 and draw(st.booleans()):  # options, sometimes wrong
        for name in draw(
            st.lists(
                st.sampled_from(["source_index", "target_index", "output_format", "max_side"]),
                max_size=2,
                unique=True,
            )
        ):
            job_input[name] = draw(fields[name])
    return {"id": "hostile", "input": job_input}


def _structured(out: Any) -> None:
    assert isinstance(out, dict), out
    if "error" in out:
        assert isinstance(out["error"], str) and out["error"], out
        assert "internal error" not in out["error"], out  # a bug, not a refusal
        return
    if out.get("success") is False:
        assert set(out) == {"success", "code", "message"}, out
        assert out["code"] in JOB_CODES, out
        assert isinstance(out["message"], str) and out["message"]
        return
    if "status" in out:  # health
        assert "capabilities" in out
        return
    assert out["success"] is True, out
    assert set(out) == {"success", "image_base64", "faces", "swapped", "ms"}, out


def test_hostile_inputs_get_structured_answers(worker: Worker, server: ImageServer) -> None:
    seen: dict[str, int] = {}

    @settings(
        max_examples=300,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(hostile_jobs(server.port))
    def check(job: Any) -> None:
        out = asyncio.run(worker.handle(job))
        _structured(out)
        key = out.get("code") or ("error" if "error" in out else "ok")
        seen[key] = seen.get(key, 0) + 1

    check()
    # The inputs really reached the deep checks, not only the first one.
    assert {"INVALID_INPUT", "NOT_AN_IMAGE", "URL_NOT_ALLOWED", "FETCH_FAILED"} <= set(seen), seen
    # And the worker still swaps faces afterwards.
    out = asyncio.run(worker.handle({"input": {"source_image": GOOD_SOURCE, "target_image": GOOD_TARGET}}))
    assert out["success"] is True and out["swapped"] == 1
