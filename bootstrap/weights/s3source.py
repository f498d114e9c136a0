"""``s3://bucket/key`` sources: boto3, imported only when an ``s3://`` source is actually used."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping
from typing import Any

from bootstrap.weights.protocol import Connection, Probe, Response, SourceFailed, Transient, clean_etag


class _S3Body:
    whole = False

    def __init__(self, body: Any) -> None:
        self.body = body

    def readinto(self, buf: memoryview) -> int:
        try:
            data = self.body.read(len(buf))
        except Exception as err:  # botocore raises its own types for a broken stream
            raise Transient(f"S3 stream broke: {type(err).__name__}: {err}") from None
        buf[: len(data)] = data
        return len(data)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.body.close()


class S3Connection:
    def __init__(self, source: S3Source) -> None:
        self.source = source

    def get(self, start: int, end: int | None) -> Response:
        rng = f"bytes={start}-{'' if end is None else end}"
        try:
            resp = self.source.client().get_object(Bucket=self.source.bucket, Key=self.source.key, Range=rng)
        except Exception as err:
            raise self.source.translate(err) from None
        return _S3Body(resp["Body"])

    def close(self) -> None:
        pass


class S3Source:
    """``s3://bucket/key``; endpoint and keys from the usual AWS_* variables (boto3's chain)."""

    def __init__(self, bucket: str, key: str, environ: Mapping[str, str], *, timeout_s: float = 30.0) -> None:
        self.bucket, self.key = bucket, key
        self.environ = environ
        self.timeout_s = timeout_s
        self.label = f"s3://{bucket}/{key}"
        self._client: Any = None
        self._lock = threading.Lock()

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                try:
                    import boto3  # lazily: only an s3:// source needs it
                    from botocore.config import Config
                except ImportError as err:
                    raise SourceFailed(f"boto3 is not installed ({err})") from None
                env = self.environ
                session = boto3.session.Session(
                    aws_access_key_id=env.get("AWS_ACCESS_KEY_ID") or None,
                    aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
                    aws_session_token=env.get("AWS_SESSION_TOKEN") or None,
                    region_name=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
                    profile_name=env.get("AWS_PROFILE") or None,
                )
                self._client = session.client(
                    "s3",
                    endpoint_url=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
                    config=Config(
                        connect_timeout=self.timeout_s,
                        read_timeout=self.timeout_s,
                        retries={"max_attempts": 2, "mode": "standard"},
                        max_pool_connections=32,
                    ),
                )
            return self._client

    def translate(self, err: Exception) -> Exception:
        if isinstance(err, SourceFailed | Transient):
            return err
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if status == 429 or status >= 500 or code in {"SlowDown", "Throttling", "RequestTimeout"}:
                return Transient(f"{code or status}")
            return SourceFailed(f"{code or status} (check the bucket, key and AWS_* credentials)")
        name = type(err).__name__
        if name in {"NoCredentialsError", "PartialCredentialsError"}:
            return SourceFailed("no AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")
        return Transient(f"{name}: {err}")

    def probe(self) -> Probe:
        try:
            head = self.client().head_object(Bucket=self.bucket, Key=self.key)
        except Exception as err:
            raise self.translate(err) from None
        return Probe(size=int(head["ContentLength"]), etag=clean_etag(head.get("ETag")))

    def connect(self) -> Connection:
        return S3Connection(self)
