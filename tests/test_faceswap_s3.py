"""``output: "s3"`` against a real moto S3 server on loopback, and clean failures without a bucket."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import io
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bootstrap.plan import Capability, Plan
from bootstrap.settings import Settings
from bootstrap.timeline import Timeline
from tests.fixture_models import b64, encode, picture, write_models_dir
from tests.helpers import free_port
from worker import output as wout
from worker.handler import Worker
from worker.lifecycle import Lifecycle, State
from worker.pipelines import faceswap
from worker.pipelines.base import LoadContext

ACCESS = "AKIAFACESWAPTEST"
SECRET = "faceswap-secret-value-never-printed"


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [exe, "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"moto_server did not start: {log.read_text()}") from None
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return write_models_dir(tmp_path_factory.mktemp("models"))


_LOADED: dict[str, faceswap.FaceSwap] = {}


def _worker(models: dict[str, str], environ: dict[str, str]) -> Worker:
    """A ready worker whose pipeline has ``environ``'s settings (the models are loaded once)."""
    settings = Settings.from_env(environ)
    key = repr(sorted(models.items()))
    if key not in _LOADED:
        _LOADED[key] = faceswap.load(LoadContext(settings=settings, models=models))
    pipe = copy.copy(_LOADED[key])
    pipe.settings = settings
    pipe.policy = dataclasses.replace(
        pipe.policy,
        max_bytes=settings.worker_max_input_bytes,
        allow_private=settings.worker_allow_private_urls,
    )
    pipe.uploader = wout.Uploader.from_settings(settings)
    w = Worker(
        plan=Plan(worker_id="t", volume="/x", app_dir="."),
        timeline=Timeline("t", stream=io.StringIO()),
        lifecycle=Lifecycle(),
    )
    w.pipelines["faceswap"] = pipe
    w.capabilities["faceswap"] = Capability()
    w.lifecycle.to(State.WARM)
    w.lifecycle.to(State.READY)
    return w


def _job(**extra: Any) -> dict[str, Any]:
    return {
        "input": {
            "source_image": b64(encode(picture(200, 200, [(60, 60, 100)]))),
            "target_image": b64(encode(picture(300, 240, [(100, 70, 90)]))),
            "output": "s3",
            **extra,
        }
    }


def _bucket_env(endpoint: str, bucket: str = "outputs", **extra: str) -> dict[str, str]:
    return {
        "BUCKET_ENDPOINT_URL": endpoint,
        "BUCKET_ACCESS_KEY_ID": ACCESS,
        "BUCKET_SECRET_ACCESS_KEY": SECRET,
        "BUCKET_NAME": bucket,
        **extra,
    }


def _make_buckets(endpoint: str, *names: str) -> Any:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS,
        aws_secret_access_key=SECRET,
        region_name="us-east-1",
    )
    for name in names:
        s3.create_bucket(Bucket=name)
    return s3


def test_output_uploaded_with_a_presigned_url(moto: str, models: dict[str, str]) -> None:
    s3 = _make_buckets(moto, "outputs", "per-job")
    worker = _worker(models, _bucket_env(moto, WORKER_S3_BUCKETS="per-job"))
    out = asyncio.run(worker.handle(_job(output_format="jpeg")))
    assert set(out) == {"success", "url", "bucket", "key", "faces", "swapped", "ms"}, out
    assert out["success"] is True and out["bucket"] == "outputs"
    assert out["key"].startswith("faceswap/") and out["key"].endswith(".jpg")
    assert set(out["ms"]) == {"fetch", "decode", "detect", "swap", "encode", "upload"}
    assert SECRET not in str(out)
    # The presigned URL really serves the picture; the object is there with its content type.
    with urllib.request.urlopen(out["url"], timeout=30) as resp:  # loopback moto
        body = resp.read()
    assert Image.open(io.BytesIO(body)).format == "JPEG"
    head = s3.head_object(Bucket="outputs", Key=out["key"])
    assert head["ContentType"] == "image/jpeg"

    # A per-job bucket and prefix override BUCKET_NAME.
    out = asyncio.run(worker.handle(_job(s3={"bucket": "per-job", "prefix": "tenant-7/swaps/"})))
    assert (
        out["bucket"] == "per-job"
        and out["key"].startswith("tenant-7/swaps/")
        and out["key"].endswith(".png")
    )
    assert s3.head_object(Bucket="per-job", Key=out["key"])["ContentLength"] > 0


def test_missing_credentials_is_a_runpod_error_naming_them(models: dict[str, str]) -> None:
    worker = _worker(models, {"BUCKET_ENDPOINT_URL": "http://127.0.0.1:9", "BUCKET_NAME": "outputs"})
    # Checked before any fetch: the source URL below is never requested.
    out = asyncio.run(
        worker.handle(
            {"input": {**_job()["input"], "source_image": None, "source_url": "http://127.0.0.1:9/x.png"}}
        )
    )
    assert set(out) == {"error"}, out
    assert set(out) == {"error"}, out
    assert "BUCKET_ACCESS_KEY_ID" in out["error"] and "BUCKET_SECRET_ACCESS_KEY" in out["error"]
    assert "/" not in out["error"].split("set")[0]  # no local path offered instead
    # Only the secret missing: named alone.
    worker = _worker(models, {"BUCKET_ACCESS_KEY_ID": ACCESS, "BUCKET_NAME": "outputs"})
    out = asyncio.run(worker.handle(_job()))
    assert "BUCKET_SECRET_ACCESS_KEY is not set" in out["error"]
    # The worker keeps serving base64 outputs.
    ok = asyncio.run(worker.handle({"input": {**_job()["input"], "output": "base64"}}))
    assert ok["success"] is True


def test_missing_bucket_and_unreachable_bucket(moto: str, models: dict[str, str]) -> None:
    env = _bucket_env(moto)
    del env["BUCKET_NAME"]
    worker = _worker(models, env)
    out = asyncio.run(worker.handle(_job()))
    assert set(out) == {"error"} and "BUCKET_NAME" in out["error"]
    # A job may name only a listed bucket; a listed one that does not exist fails at upload.
    out = asyncio.run(worker.handle(_job(s3={"bucket": "no-such-bucket"})))
    assert out["success"] is False and out["code"] == "INVALID_INPUT", out
    worker = _worker(models, {**env, "WORKER_S3_BUCKETS": "no-such-bucket"})
    out = asyncio.run(worker.handle(_job(s3={"bucket": "no-such-bucket"})))
    assert set(out) == {"error"} and "no-such-bucket" in out["error"]
    assert SECRET not in out["error"]


def _expires(url: str) -> int:
    from urllib.parse import parse_qs, urlsplit

    return int(parse_qs(urlsplit(url).query)["X-Amz-Expires"][0])


def test_presigned_urls_live_a_day_unless_set(moto: str, models: dict[str, str]) -> None:
    _make_buckets(moto, "ttl-default")
    out = asyncio.run(_worker(models, _bucket_env(moto, "ttl-default")).handle(_job()))
    assert out["success"] is True and _expires(out["url"]) == 86400
    out = asyncio.run(
        _worker(models, _bucket_env(moto, "ttl-default", WORKER_PRESIGN_TTL_S="600")).handle(_job())
    )
    assert _expires(out["url"]) == 600
    with urllib.request.urlopen(out["url"], timeout=30) as resp:  # loopback moto
        assert resp.status == 200


@pytest.mark.parametrize(
    "prefix",
    [
        "../../xyz",
        "a/../b",
        "./x",
        "a/./b",
        "a//b",
        "tenant 7",
        "tenant\\7",
        "ünï",
        "a/" + "x" * 300,
        "%2e%2e",
    ],
)
def test_s3_prefix_of_plain_segments_only(moto: str, models: dict[str, str], prefix: str) -> None:
    s3 = _make_buckets(moto, "prefixes")
    worker = _worker(models, _bucket_env(moto, "prefixes"))
    out = asyncio.run(worker.handle(_job(s3={"prefix": prefix})))
    assert out["success"] is False and out["code"] == "INVALID_INPUT", out
    assert "s3.prefix" in out["message"]
    assert s3.list_objects_v2(Bucket="prefixes").get("KeyCount", 0) == 0


def test_s3_prefix_and_listed_bucket_are_used(moto: str, models: dict[str, str]) -> None:
    s3 = _make_buckets(moto, "main-out", "tenant-a")
    worker = _worker(models, _bucket_env(moto, "main-out", WORKER_S3_BUCKETS="tenant-a, other"))
    out = asyncio.run(worker.handle(_job(s3={"bucket": "tenant-a", "prefix": "/a.b/c_d-e/"})))
    assert out["bucket"] == "tenant-a" and out["key"].startswith("a.b/c_d-e/"), out
    assert s3.head_object(Bucket="tenant-a", Key=out["key"])["ContentLength"] > 0
    # BUCKET_NAME itself may always be named.
    out = asyncio.run(worker.handle(_job(s3={"bucket": "main-out"})))
    assert out["bucket"] == "main-out" and out["key"].startswith("faceswap/")


@pytest.mark.parametrize(
    "bucket",
    [
        "Outputs",
        "ab",
        "a" * 64,
        "-outputs",
        "out..puts",
        "192.168.0.1",
        "xn--outputs",
        "out_puts",
        "out/puts",
    ],
)
def test_bad_bucket_names_are_invalid_input_before_any_fetch(
    moto: str, models: dict[str, str], bucket: str
) -> None:
    from tests.fixture_models import ImageServer

    images = ImageServer()
    try:
        src = images.add("/src.png", encode(picture(200, 200, [(60, 60, 100)])))
        # Listed by the operator, still not a bucket name: refused at parsing, not at upload.
        worker = _worker(models, _bucket_env(moto, WORKER_S3_BUCKETS=bucket, WORKER_ALLOW_PRIVATE_URLS="1"))
        job = _job(s3={"bucket": bucket})
        del job["input"]["source_image"]
        job["input"]["source_url"] = src
        out = asyncio.run(worker.handle(job))
    finally:
        images.close()
    assert out["success"] is False and out["code"] == "INVALID_INPUT", out
    assert "not a valid bucket name" in out["message"]
    assert images.hits == []


def test_an_unlisted_bucket_is_refused_before_any_fetch(moto: str, models: dict[str, str]) -> None:
    from tests.fixture_models import ImageServer

    s3 = _make_buckets(moto, "endpoint-own", "someone-elses")
    images = ImageServer()
    try:
        src = images.add("/src.png", encode(picture(200, 200, [(60, 60, 100)])))
        worker = _worker(models, _bucket_env(moto, "endpoint-own", WORKER_ALLOW_PRIVATE_URLS="1"))
        job = _job(s3={"bucket": "someone-elses"})
        del job["input"]["source_image"]
        job["input"]["source_url"] = src
        out = asyncio.run(worker.handle(job))
    finally:
        images.close()
    assert out["success"] is False and out["code"] == "INVALID_INPUT", out
    assert "WORKER_S3_BUCKETS" in out["message"]
    assert images.hits == []
    assert s3.list_objects_v2(Bucket="someone-elses").get("KeyCount", 0) == 0
