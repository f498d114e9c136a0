"""Where a job's result goes: inline base64, or the job bucket on S3 with a presigned URL (SPEC §10).

- Output options (`parse_output`, shared by every task): ``output`` base64|s3 and ``s3``
  ``{bucket, prefix}``; the prefix is plain ``[A-Za-z0-9._-]`` segments (no ``.``/``..``), the
  bucket a valid S3 name that ``BUCKET_NAME`` or ``WORKER_S3_BUCKETS`` allows — checked while
  parsing, before any fetch or model run.
- Upload: only the ``BUCKET_*`` settings, never a silent local fallback (FAILURES F20); URLs
  presigned for ``WORKER_PRESIGN_TTL_S``. A problem of the operator's (bucket credentials) is a
  `WorkerFault`.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from worker.errors import JobError, WorkerFault

if TYPE_CHECKING:
    from bootstrap.settings import Settings

#: what an uploaded object of each format is (images, and the speech capability's audio)
CONTENT_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
CONTENT_TYPES.update({"WAV": "audio/wav", "FLAC": "audio/flac", "MP3": "audio/mpeg", "OGG": "audio/ogg"})
EXTENSIONS.update({"WAV": "wav", "FLAC": "flac", "MP3": "mp3", "OGG": "ogg"})
#: presigned URL lifetime unless WORKER_PRESIGN_TTL_S says otherwise (SPEC §3)
PRESIGN_TTL_S = 24 * 3600


ENDPOINT = "BUCKET_ENDPOINT_URL"
ACCESS_KEY = "BUCKET_ACCESS_KEY_ID"
SECRET_KEY = "BUCKET_SECRET_ACCESS_KEY"  # noqa: S105 - the variable's name, not a secret
BUCKET = "BUCKET_NAME"
REGION = "BUCKET_REGION"
OUTPUTS = ("base64", "s3")
#: A key prefix segment: plain characters only (no "." or ".." segment, no empty one).
_PREFIX_SEGMENT = re.compile(r"[A-Za-z0-9._-]{1,255}")
#: S3's bucket naming rules: 3-63 of a-z 0-9 . -, starting and ending with a letter or digit.
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


@dataclass(frozen=True)
class Output:
    """Where a job's result goes: inline ``base64``, or ``s3`` (the job's bucket and prefix, or None)."""

    kind: str = "base64"
    bucket: str | None = None
    prefix: str | None = None


def bucket_problem(name: str) -> str | None:
    """Why ``name`` is not a valid S3 bucket name, or None."""
    if not _BUCKET_NAME.fullmatch(name):
        return "3-63 characters of a-z, 0-9, '.' and '-', starting and ending with a letter or digit"
    if ".." in name or ".-" in name or "-." in name:
        return "no '..', '.-' or '-.'"
    if re.fullmatch(r"\d+\.\d+\.\d+\.\d+", name):
        return "not formatted as an IP address"
    if name.startswith(("xn--", "sthree-")) or name.endswith(("-s3alias", "--ol-s3")):
        return "no reserved prefix (xn--, sthree-) or suffix (-s3alias, --ol-s3)"
    return None


def _prefix(value: str) -> str:
    segments = value.strip("/").split("/")
    for segment in segments:
        if segment in (".", "..") or not _PREFIX_SEGMENT.fullmatch(segment):
            raise JobError(
                "INVALID_INPUT",
                f"s3.prefix segment {segment[:80]!r} is not allowed: use '/'-separated segments of "
                "A-Z, a-z, 0-9, '.', '_' and '-', none of them '.' or '..'",
            )
    return "/".join(segments)


def parse_output(job: Mapping[str, Any], allowed_buckets: Collection[str]) -> Output:
    """A job's ``output`` (``base64`` | ``s3``) and ``s3`` (``{"bucket", "prefix"}``), checked.

    Every task with an S3 output calls this while parsing its input, so a bad prefix or bucket is
    INVALID_INPUT before any fetch or model run. ``allowed_buckets`` is `Uploader.allowed_buckets`:
    a job may name only those (SPEC §3, ``WORKER_S3_BUCKETS``).
    """
    kind = job.get("output", "base64")
    if not isinstance(kind, str) or kind.strip().lower() not in OUTPUTS:
        raise JobError("INVALID_INPUT", "output must be 'base64' or 's3'")
    kind = kind.strip().lower()
    s3 = job.get("s3")
    if s3 is None:
        return Output(kind)
    if kind != "s3":
        raise JobError("INVALID_INPUT", "'s3' is only used with output: 's3'")
    if not isinstance(s3, dict) or set(s3) - {"bucket", "prefix"}:
        raise JobError("INVALID_INPUT", "s3 must be an object with 'bucket' and/or 'prefix'")
    for key, value in s3.items():
        if not isinstance(value, str) or len(value) > 1024 or any(ord(c) < 32 for c in value):
            raise JobError("INVALID_INPUT", f"s3.{key} must be a string without control characters")
    bucket = s3.get("bucket", "").strip() or None
    if bucket is not None:
        why = bucket_problem(bucket)
        if why is not None:
            raise JobError("INVALID_INPUT", f"s3.bucket {bucket[:80]!r} is not a valid bucket name: {why}")
        if bucket not in allowed_buckets:
            raise JobError(
                "INVALID_INPUT",
                f"s3.bucket {bucket!r} is not a bucket this endpoint lets jobs name "
                f"(the operator lists them in WORKER_S3_BUCKETS); leave s3.bucket out to use the endpoint's own",
            )
    prefix = _prefix(s3["prefix"]) if s3.get("prefix", "").strip("/") else None
    return Output(kind, bucket, prefix)


@dataclass
class Uploader:
    """Uploads outputs to the job bucket (RunPod's ``BUCKET_*`` settings) and presigns a URL."""

    environ: Mapping[str, str]
    #: buckets a job may name besides BUCKET_NAME (WORKER_S3_BUCKETS)
    buckets: tuple[str, ...] = ()
    presign_ttl_s: int = PRESIGN_TTL_S
    _client: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_settings(cls, settings: Settings) -> Uploader:
        return cls(
            settings.environ, buckets=settings.worker_s3_buckets, presign_ttl_s=settings.worker_presign_ttl_s
        )

    @property
    def default_bucket(self) -> str | None:
        return (self.environ.get(BUCKET) or "").strip() or None

    @property
    def allowed_buckets(self) -> frozenset[str]:
        """WORKER_S3_BUCKETS and BUCKET_NAME: what a job's ``s3.bucket`` may name."""
        default = self.default_bucket
        return frozenset(self.buckets) | ({default} if default else set())

    def _settings(self) -> tuple[str | None, str, str]:
        endpoint = (self.environ.get(ENDPOINT) or "").strip() or None
        access = (self.environ.get(ACCESS_KEY) or "").strip()
        secret = (self.environ.get(SECRET_KEY) or "").strip()
        missing = [name for name, value in ((ACCESS_KEY, access), (SECRET_KEY, secret)) if not value]
        if missing:
            raise WorkerFault(
                f"output 's3' needs bucket credentials, but {' and '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not set on this endpoint; set "
                f"{ENDPOINT}, {ACCESS_KEY}, {SECRET_KEY} and {BUCKET} (or send output 'base64')"
            )
        return endpoint, access, secret

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                endpoint, access, secret = self._settings()
                import boto3
                from botocore.config import Config

                self._client = boto3.session.Session().client(
                    "s3",
                    endpoint_url=endpoint,
                    aws_access_key_id=access,
                    aws_secret_access_key=secret,
                    region_name=(self.environ.get(REGION) or "").strip() or "us-east-1",
                    config=Config(
                        signature_version="s3v4",
                        s3={"addressing_style": "path" if endpoint else "auto"},
                        retries={"max_attempts": 3, "mode": "standard"},
                        connect_timeout=10,
                        read_timeout=60,
                    ),
                )
            return self._client

    def check(self, target: Output) -> str:
        """The bucket to use; a WorkerFault naming what is missing (run before any model work)."""
        self._settings()  # credentials first: the message names what is missing
        bucket = target.bucket or self.default_bucket
        if not bucket:
            raise WorkerFault(f"output 's3' needs a bucket: set {BUCKET} on the endpoint")
        return bucket

    def upload(
        self, data: bytes, *, ext: str, content_type: str, target: Output, prefix: str
    ) -> dict[str, str]:
        """Put ``data`` at ``<prefix>/<date>/<uuid>.<ext>`` (the job's prefix, else ``prefix``);
        return url (presigned for ``presign_ttl_s``), bucket, key."""
        bucket = self.check(target)
        key = self._key(target, prefix, ext)
        client = self.client()
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)
            url = client.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=self.presign_ttl_s
            )
        except (BotoCoreError, ClientError) as err:
            raise WorkerFault(f"uploading the output to bucket {bucket!r} failed: {err}") from None
        return {"url": str(url), "bucket": bucket, "key": key}

    def upload_file(
        self,
        fileobj: Any,
        *,
        ext: str,
        content_type: str,
        target: Output,
        prefix: str,
        part_bytes: int = 16 * 1024 * 1024,
    ) -> dict[str, str]:
        """Like `upload`, for large outputs read from ``fileobj`` (e.g. a video on the container
        disk): boto3's transfer manager sends parts of ``part_bytes`` in parallel (multipart
        above one part), never the whole file in memory; then a presigned GET URL."""
        bucket = self.check(target)
        key = self._key(target, prefix, ext)
        client = self.client()
        from boto3.s3.transfer import TransferConfig
        from botocore.exceptions import BotoCoreError, ClientError

        config = TransferConfig(
            multipart_threshold=part_bytes,
            multipart_chunksize=part_bytes,
            max_concurrency=4,
            use_threads=True,
        )
        try:
            fileobj.seek(0)
            client.upload_fileobj(
                fileobj, bucket, key, ExtraArgs={"ContentType": content_type}, Config=config
            )
            url = client.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=self.presign_ttl_s
            )
        except (BotoCoreError, ClientError) as err:
            raise WorkerFault(f"uploading the output to bucket {bucket!r} failed: {err}") from None
        return {"url": str(url), "bucket": bucket, "key": key}

    @staticmethod
    def _key(target: Output, prefix: str, ext: str) -> str:
        """``<the job's prefix, else prefix>/<date>/<uuid>.<ext>``."""
        return (
            f"{target.prefix or prefix}/{time.strftime('%Y-%m-%d', time.gmtime())}/{uuid.uuid4().hex}.{ext}"
        )
