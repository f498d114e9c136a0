"""``output: "s3"`` against a real moto S3 server on loopback, and clean failures without a bucket."""

from __future__ import annotations

import asyncio
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

from bootstrap.plan import Plan
from bootstrap.settings import Settings
from bootstrap.timeline import Timeline
from tests.fixture_models import b64, encode, picture, write_models_dir
from tests.helpers import free_port
from worker.handler import Worker
from worker.lifecycle import Lifecycle
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


def _worker(models: dict[str, str], environ: dict[str, str]) -> Worker:
    settings = Settings.from_env(environ)
    pipe = faceswap.load(LoadContext(settings=settings, models=models))
    w = Worker(
        plan=Plan(worker_id="t", volume="/x", app_dir="."),
        timeline=Timeline("t", stream=io.StringIO()),
        lifecycle=Lifecycle(),
    )
    w.pipelines["faceswap"] = pipe
    w.capabilities["faceswap"] = {"status": "ok", "reason": None}
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


def _bucket_env(endpoint: str, bucket: str = "outputs") -> dict[str, str]:
    return {
        "BUCKET_ENDPOINT_URL": endpoint,
        "BUCKET_ACCESS_KEY_ID": ACCESS,
        "BUCKET_SECRET_ACCESS_KEY": SECRET,
        "BUCKET_NAME": bucket,
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
    worker = _worker(models, _bucket_env(moto))
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
    out = asyncio.run(worker.handle(_job(s3={"bucket": "no-such-bucket"})))
    assert set(out) == {"error"} and "no-such-bucket" in out["error"]
    assert SECRET not in out["error"]
