"""The worker's own webhook (SPEC §11) against real loopback receivers, through `Worker.handle`."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from bootstrap.plan import Capability, Plan
from bootstrap.settings import Settings
from bootstrap.timeline import Timeline
from tests.fixture_models import b64, encode, picture, write_models_dir
from tests.webhook_receiver import Receiver
from worker import webhook
from worker.handler import Worker
from worker.lifecycle import Lifecycle, State
from worker.pipelines import faceswap
from worker.pipelines.base import LoadContext

SECRET = "webhook-secret-never-printed-1234"


def _config(**kw: Any) -> webhook.WebhookConfig:
    base: dict[str, Any] = {
        "secret": SECRET,
        "allow_private": True,
        "backoff_first_s": 0.05,
        "backoff_max_s": 0.2,
        "max_s": 5.0,
        "attempt_timeout_s": 2.0,
    }
    base.update(kw)
    return webhook.WebhookConfig(**base)


def _bare_worker(config: webhook.WebhookConfig, stream: io.StringIO | None = None) -> Worker:
    w = Worker(
        plan=Plan(worker_id="t", volume="/x", app_dir="."),
        timeline=Timeline("t", stream=stream or io.StringIO()),
        lifecycle=Lifecycle(),
        webhooks=config,
    )
    w.lifecycle.to(State.WARM)
    w.lifecycle.to(State.READY)
    return w


def _check_signed(delivery: Any, job_id: str) -> dict[str, Any]:
    assert delivery.headers["X-Worker-Delivery"] == job_id
    assert delivery.headers["Content-Type"] == "application/json"
    sig = delivery.headers["X-Worker-Signature"]
    assert sig.startswith("sha256=") and len(sig) == 7 + 64
    assert webhook.verify(delivery.body, sig, SECRET)
    assert not webhook.verify(delivery.body, sig, SECRET + "x")
    assert not webhook.verify(delivery.body + b" ", sig, SECRET)
    body: dict[str, Any] = delivery.json()
    assert body["id"] == job_id and isinstance(body["ts"], float)
    return body


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return write_models_dir(tmp_path_factory.mktemp("models"))


def test_picture_job_delivers_one_signed_webhook_for_success_and_failure(models: dict[str, str]) -> None:
    settings = Settings.from_env({"WORKER_ALLOW_PRIVATE_URLS": "1", "WORKER_WEBHOOK_SECRET": SECRET})
    worker = _bare_worker(_config())
    worker.pipelines["faceswap"] = faceswap.load(LoadContext(settings=settings, models=models))
    worker.capabilities["faceswap"] = Capability()
    with Receiver() as rx:
        job = {
            "id": "job-ok",
            "input": {
                "source_image": b64(encode(picture(200, 200, [(60, 60, 100)]))),
                "target_image": b64(encode(picture(300, 240, [(100, 70, 90)]))),
                "webhook": rx.url("/hook?token=abc"),
            },
        }
        out = asyncio.run(worker.handle(job))
        assert out["success"] is True
        assert out["webhook"] == {"delivered": True, "attempts": 1, "error": None}
        assert len(rx.deliveries) == 1
        d = rx.deliveries[0]
        assert d.path == "/hook?token=abc"
        body = _check_signed(d, "job-ok")
        assert body["status"] == "COMPLETED" and set(body) == {"id", "status", "output", "ts"}
        assert body["output"]["success"] is True and body["output"]["image_base64"] == out["image_base64"]
        assert "webhook" not in body["output"]

        # A job whose input is at fault still delivers (COMPLETED with success false) ...
        bad = {"id": "job-bad", "input": {**job["input"], "target_image": b64(encode(picture(200, 200, [])))}}
        out = asyncio.run(worker.handle(bad))
        assert out["code"] == "NO_FACE_IN_TARGET" and out["webhook"]["delivered"] is True
        body = _check_signed(rx.deliveries[1], "job-bad")
        assert body["status"] == "COMPLETED" and body["output"]["code"] == "NO_FACE_IN_TARGET"

        # ... and a RunPod error (the worker's fault) is FAILED with the error.
        s3 = {"id": "job-fault", "input": {**job["input"], "output": "s3"}}
        out = asyncio.run(worker.handle(s3))
        assert "error" in out and out["webhook"]["delivered"] is True
        body = _check_signed(rx.deliveries[2], "job-fault")
        assert body["status"] == "FAILED" and set(body) == {"id", "status", "error", "ts"}
        assert "BUCKET_ACCESS_KEY_ID" in body["error"]
        assert len(rx.deliveries) == 3

        # health takes no webhook
        health = asyncio.run(worker.handle({"id": "h", "input": {"task": "health", "webhook": rx.url()}}))
        assert "webhook" not in health and len(rx.deliveries) == 3


def test_500_twice_then_200_is_delivered_on_the_third_try() -> None:
    worker = _bare_worker(_config())
    with Receiver([500, 503]) as rx:
        out = asyncio.run(worker.handle({"id": "j3", "input": {"task": "nope", "webhook": rx.url()}}))
    assert out["code"] == "UNKNOWN_TASK"
    assert out["webhook"] == {"delivered": True, "attempts": 3, "error": None}
    assert len(rx.deliveries) == 3
    # every retry is the same delivery: same id, same bytes, same signature
    assert len({d.body for d in rx.deliveries}) == 1
    assert {d.headers["X-Worker-Delivery"] for d in rx.deliveries} == {"j3"}
    _check_signed(rx.deliveries[-1], "j3")


def test_connection_errors_are_retried_and_4xx_and_redirects_are_not() -> None:
    worker = _bare_worker(_config())
    with Receiver([0, 200]) as rx:
        out = asyncio.run(worker.handle({"id": "c", "input": {"task": "nope", "webhook": rx.url()}}))
    assert out["webhook"] == {"delivered": True, "attempts": 2, "error": None}
    with Receiver([404]) as rx:
        out = asyncio.run(worker.handle({"id": "d", "input": {"task": "nope", "webhook": rx.url()}}))
    assert out["webhook"]["delivered"] is False and out["webhook"]["attempts"] == 1
    assert "HTTP 404" in out["webhook"]["error"] and len(rx.deliveries) == 1
    with Receiver([302, 200], headers={"Location": "http://127.0.0.1:9/elsewhere"}) as rx:
        out = asyncio.run(worker.handle({"id": "e", "input": {"task": "nope", "webhook": rx.url()}}))
    assert out["webhook"]["delivered"] is False and out["webhook"]["attempts"] == 1
    assert "redirects are not followed" in out["webhook"]["error"]
    assert len(rx.deliveries) == 1


def test_undeliverable_webhook_never_fails_the_job_and_gives_up_within_max_s() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stream = io.StringIO()
    worker = _bare_worker(_config(max_s=1.0), stream)
    t0 = time.monotonic()
    out = asyncio.run(
        worker.handle(
            {"id": "u", "input": {"task": "nope", "webhook": f"http://127.0.0.1:{port}/h?sig=SECRETQ"}}
        )
    )
    elapsed = time.monotonic() - t0
    assert out["code"] == "UNKNOWN_TASK"
    assert out["webhook"]["delivered"] is False and out["webhook"]["attempts"] >= 3
    assert "ConnectionRefusedError" in out["webhook"]["error"]
    assert elapsed < 3.0
    log = stream.getvalue()
    assert "not delivered" in log and f"127.0.0.1:{port}/h" in log
    assert "SECRETQ" not in log and "SECRETQ" not in json.dumps(out)  # the query is never logged
    end = [json.loads(x) for x in log.splitlines() if x.startswith("{") and '"job"' in x]
    assert not end or all("webhook" not in e.get("detail", {}) for e in end)


def test_unsigned_without_a_secret() -> None:
    worker = _bare_worker(_config(secret=None))
    with Receiver() as rx:
        out = asyncio.run(worker.handle({"id": "n", "input": {"task": "nope", "webhook": rx.url()}}))
    assert out["webhook"]["delivered"] is True
    assert "X-Worker-Signature" not in rx.deliveries[0].headers
    assert rx.deliveries[0].headers["X-Worker-Delivery"] == "n"
    assert webhook.WebhookConfig().describe() == {
        "signed": False,
        "hint": "set WORKER_WEBHOOK_SECRET to sign webhooks",
    }


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("http://127.0.0.1:9/h", "URL_NOT_ALLOWED"),  # loopback, refused before any connection
        ("http://169.254.169.254/latest/meta-data", "URL_NOT_ALLOWED"),
        ("http://[::ffff:10.0.0.1]/h", "URL_NOT_ALLOWED"),
        ("file:///etc/passwd", "URL_NOT_ALLOWED"),
        ("ftp://example.com/x", "URL_NOT_ALLOWED"),
        ("", "INVALID_INPUT"),
        (42, "INVALID_INPUT"),
        ("http://exa mple.com/", "INVALID_INPUT"),
    ],
)
def test_webhook_address_rules_at_parse_time(url: object, code: str) -> None:
    worker = _bare_worker(_config(allow_private=False))
    out = asyncio.run(worker.handle({"id": "p", "input": {"task": "nope", "webhook": url}}))
    # refused before the job ran: not UNKNOWN_TASK, and no delivery attempted
    assert out["code"] == code and "webhook" not in out, out


def test_webhook_settings_and_secret_redaction() -> None:
    settings = Settings.from_env({"WORKER_WEBHOOK_SECRET": SECRET})
    config = webhook.WebhookConfig.from_settings(settings)
    assert config.signed and SECRET not in repr(config) and SECRET not in repr(settings)
    assert ("WORKER_WEBHOOK_SECRET", f"set ({len(SECRET)} chars)", "env") in settings.shown()
    # the body is signed byte for byte
    body = webhook.body_for("x", {"success": True}, 1.5)
    assert json.loads(body) == {"id": "x", "status": "COMPLETED", "output": {"success": True}, "ts": 1.5}
    assert webhook.signature(body, "k") == webhook.signature(body, "k") != webhook.signature(body, "k2")


def test_module_is_a_library_for_other_tasks(tmp_path: Path) -> None:
    """speech/animate call parse + after_job directly, without a Worker."""
    with Receiver() as rx:
        target = webhook.parse({"task": "tts", "webhook": rx.url()}, _config())
        assert target is not None
        out = asyncio.run(webhook.after_job(target, {"id": "lib"}, {"success": True}, _config()))
    assert out == {"success": True, "webhook": {"delivered": True, "attempts": 1, "error": None}}
    _check_signed(rx.deliveries[0], "lib")
