"""The worker's own webhook (SPEC §11): ``input.webhook`` gets the job's result POSTed when the
job ends, successful or not. RunPod's platform ``webhook`` (beside ``input``) is not this.

- Checked when the input is parsed (`parse`): http(s) only and, unless
  ``WORKER_ALLOW_PRIVATE_URLS=1``, every address of the host public — the rules of the job's
  input URLs (`worker.fetch`); a bad one is ``URL_NOT_ALLOWED`` / ``INVALID_INPUT`` before any work.
- Body: ``{"id", "status": "COMPLETED"|"FAILED", "output"|"error", "ts"}``; ``FAILED`` with
  ``error`` for a RunPod error (the worker's fault), ``COMPLETED`` with ``output`` otherwise —
  also for a ``success: false`` answer, as RunPod itself reports those.
- Headers: ``X-Worker-Signature: sha256=<hex HMAC-SHA256 of the exact body bytes>`` keyed with
  ``WORKER_WEBHOOK_SECRET`` (absent when no secret is set: then the delivery is unsigned and
  ``health`` says so) and ``X-Worker-Delivery: <job id>`` — the same for every retry, so a
  receiver deduplicates on it.
- Delivery (`deliver`): the host is resolved and checked again, and the connection goes to the
  checked address; connection errors and 5xx answers are retried with exponential backoff
  (0.5 s, 1 s, 2 s, … capped at 8 s) for at most ``max_s`` (60 s) in all; a 2xx is delivered, a
  redirect is never followed and, like a 4xx, ends the delivery.
- The result: the job's own output gains ``webhook: {"delivered", "attempts", "error"}``; a
  delivery that failed is logged with its URL *without* the query (tokens often live there) and
  never fails the job.

Usable from any task: `parse` and `after_job` take plain data and a `WebhookConfig`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import http.client
import json
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from worker import fetch as wfetch
from worker.errors import JobError

MAX_DELIVERY_S = 60.0
ATTEMPT_TIMEOUT_S = 10.0
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 8.0
SIGNATURE_HEADER = "X-Worker-Signature"
DELIVERY_HEADER = "X-Worker-Delivery"
USER_AGENT = "volume-worker/0.1 (+webhook)"


@dataclass(frozen=True)
class WebhookConfig:
    """How webhooks are checked and sent; built once from the settings."""

    secret: str | None = field(default=None, repr=False)
    allow_private: bool = False
    max_s: float = MAX_DELIVERY_S
    attempt_timeout_s: float = ATTEMPT_TIMEOUT_S
    backoff_first_s: float = BACKOFF_FIRST_S
    backoff_max_s: float = BACKOFF_MAX_S
    resolve: wfetch.Resolver = wfetch._default_resolve
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.time

    @classmethod
    def from_settings(cls, settings: Any) -> WebhookConfig:
        return cls(
            secret=getattr(settings, "worker_webhook_secret", None),
            allow_private=bool(getattr(settings, "worker_allow_private_urls", False)),
        )

    @property
    def signed(self) -> bool:
        return bool(self.secret)

    def policy(self) -> wfetch.FetchPolicy:
        return wfetch.FetchPolicy(
            max_bytes=0,
            allow_private=self.allow_private,
            timeout_s=self.attempt_timeout_s,
            resolve=self.resolve,
        )

    def describe(self) -> dict[str, Any]:
        """For ``health``: whether deliveries are signed (never the secret)."""
        return {
            "signed": self.signed,
            **({} if self.signed else {"hint": "set WORKER_WEBHOOK_SECRET to sign webhooks"}),
        }


@dataclass(frozen=True)
class Target:
    url: str

    @property
    def shown(self) -> str:
        """The URL for logs and messages: no user:password, no query."""
        return wfetch._shown(self.url)


def parse(job_input: Any, config: WebhookConfig) -> Target | None:
    """``input.webhook`` checked by the input URL rules, or None (absent, or task ``health``)."""
    if not isinstance(job_input, dict) or job_input.get("webhook") is None:
        return None
    if job_input.get("task") == "health":
        return None
    value = job_input["webhook"]
    if not isinstance(value, str) or not value.strip():
        raise JobError("INVALID_INPUT", "webhook must be a non-empty URL string")
    url = value.strip()
    _scheme, host, port, _path = wfetch._check_url(url)
    policy = config.policy()
    try:
        wfetch._checked_addresses(host, port, policy, url, time.monotonic() + policy.timeout_s)
    except JobError as err:
        if err.code == "URL_NOT_ALLOWED":
            raise
        # Not resolvable now: not the job's fault yet; the delivery will say what happened.
    return Target(url)


def signature(body: bytes, secret: str) -> str:
    """``sha256=<hex>``: HMAC-SHA256 of the exact body bytes."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def verify(body: bytes, header: str | None, secret: str) -> bool:
    """What a receiver does: compare the header with its own HMAC in constant time."""
    return header is not None and hmac.compare_digest(header, signature(body, secret))


def body_for(job_id: str | None, out: Mapping[str, Any], ts: float) -> bytes:
    """The POSTed JSON (see the module docstring)."""
    payload: dict[str, Any] = {"id": job_id}
    if "error" in out and "success" not in out:
        payload["status"] = "FAILED"
        payload["error"] = out["error"]
    else:
        payload["status"] = "COMPLETED"
        payload["output"] = dict(out)
    payload["ts"] = round(ts, 3)
    return json.dumps(payload, separators=(",", ":"), default=str).encode("utf-8")


@dataclass
class Delivery:
    delivered: bool = False
    attempts: int = 0
    error: str | None = None
    status: int | None = None

    def result(self) -> dict[str, Any]:
        return {"delivered": self.delivered, "attempts": self.attempts, "error": self.error}


def _post_once(target: Target, body: bytes, headers: dict[str, str], config: WebhookConfig) -> int:
    """One POST to the checked address; its HTTP status (raises OSError-likes on connection trouble)."""
    scheme, host, port, path = wfetch._check_url(target.url)
    policy = config.policy()
    addrs = wfetch._checked_addresses(host, port, policy, target.url, time.monotonic() + policy.timeout_s)
    conn = wfetch.open_connection(scheme, host, port, addrs[0], config.attempt_timeout_s)
    try:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        resp.read(65536)  # a little of the answer, so the receiver sees a clean close
        return int(resp.status)
    finally:
        conn.close()


def deliver(target: Target, job_id: str | None, out: Mapping[str, Any], config: WebhookConfig) -> Delivery:
    """POST the result, retrying connection errors and 5xx with backoff for at most ``max_s``."""
    body = body_for(job_id, out, config.clock())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        DELIVERY_HEADER: str(job_id),
    }
    if config.secret:
        headers[SIGNATURE_HEADER] = signature(body, config.secret)
    started = time.monotonic()
    delay = config.backoff_first_s
    result = Delivery()
    while True:
        result.attempts += 1
        retry = False
        try:
            status = _post_once(target, body, headers, config)
            result.status = status
            if 200 <= status < 300:
                result.delivered, result.error = True, None
                return result
            if 300 <= status < 400:
                result.error = f"{target.shown} answered HTTP {status}: redirects are not followed"
            else:
                result.error = f"{target.shown} answered HTTP {status}"
                retry = status >= 500
        except JobError as err:  # the address check at delivery time, or resolution
            result.error = err.message
            retry = err.code != "URL_NOT_ALLOWED"
        except (OSError, http.client.HTTPException, ssl.SSLError) as err:
            result.error = f"{target.shown}: {type(err).__name__}: {err}"
            retry = True
        left = config.max_s - (time.monotonic() - started)
        if not retry or left <= 0:
            return result
        config.sleep(min(delay, left))
        if time.monotonic() - started >= config.max_s:
            return result
        delay = min(delay * 2, config.backoff_max_s)


async def after_job(
    target: Target | None,
    job: Mapping[str, Any],
    out: dict[str, Any],
    config: WebhookConfig,
    timeline: Any = None,
) -> dict[str, Any]:
    """Deliver ``out`` to ``target`` (off the event loop) and add ``webhook`` to it."""
    if target is None:
        return out
    job_id = job.get("id") if isinstance(job, Mapping) else None
    delivery = await asyncio.to_thread(deliver, target, None if job_id is None else str(job_id), out, config)
    if not delivery.delivered and timeline is not None:
        timeline.log(
            f"webhook for job {job_id} to {target.shown} not delivered after {delivery.attempts} attempt(s): {delivery.error}",
            level="warn",
        )
    return {**out, "webhook": delivery.result()}
