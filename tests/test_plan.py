"""The plan is the one channel from the boot to the worker: settings travel in it, never as env vars."""

from __future__ import annotations

from pathlib import Path

from bootstrap.plan import Plan, read_plan, write_plan
from bootstrap.run import serve_settings, worker_environ
from bootstrap.settings import PLAN, Settings
from tests.helpers import base_environ

SECRETS = {
    "HF_TOKEN": "hf_never_in_the_plan_123",
    "BUCKET_SECRET_ACCESS_KEY": "bucket-secret-never-in-plan",
    "WORKER_WEBHOOK_SECRET": "webhook-secret-never-in-plan",
}
MIRROR_PASSWORD = "mirror-pass-never-in-plan"


def test_the_worker_reads_the_boots_settings_from_the_plan(tmp_path: Path) -> None:
    boot_env = base_environ(
        BOOTSTRAP_VOLUME=str(tmp_path),
        BOOTSTRAP_WORKER_ID="w-plan",
        BOOTSTRAP_LOG_FORMAT="json",
        BOOTSTRAP_EXTRAS="faceswap",
        BOOTSTRAP_PHASE_BUDGET_S="warm=42",
        WORKER_CONCURRENCY="3",
        WORKER_MAX_PIXELS="1234",
        BUCKET_NAME="outputs",
        BOOTSTRAP_MIRROR=f"https://user:{MIRROR_PASSWORD}@mirror.invalid/w",
        **SECRETS,
    )
    # `bootstrap serve` changes settings in the boot only (the API on, everything optional).
    boot = serve_settings(Settings.from_env(boot_env), "127.0.0.1", 8123)
    plan = Plan(worker_id=boot.worker_id, volume=str(tmp_path), app_dir=str(boot.app_dir))
    plan.carry(boot)
    path = tmp_path / "state" / "w-plan.json"
    write_plan(path, plan)
    text = path.read_text()
    assert not [v for v in (*SECRETS.values(), MIRROR_PASSWORD) if v in text]  # on a shared volume

    env = worker_environ(boot, path)
    assert env[PLAN] == str(path)
    # What `serve` resolved is not re-exported as variables for the worker to parse again: the
    # plan is the one channel (and the worker's environment may lack even what the user set).
    assert "BOOTSTRAP_SERVE_API" not in env and "BOOTSTRAP_OPTIONAL" not in env
    bare = {k: v for k, v in env.items() if not k.startswith("BOOTSTRAP_") or k == PLAN}
    got = read_plan(path).worker_settings(bare)
    assert got.worker_id == "w-plan" and got.log_format == "json"
    assert got.serve_api == ("127.0.0.1", 8123)
    assert got.optional == frozenset({"faceswap"}) and got.extras == ("faceswap",)
    assert got.budget("warm") == 42.0
    assert got.worker_concurrency == 3 and got.worker_max_pixels == 1234
    assert got.app_dir == boot.app_dir and isinstance(got.app_dir, Path)
    # credentials come from the worker's own environment, typed
    assert (
        got.bucket.name == "outputs" and got.bucket.secret_access_key == SECRETS["BUCKET_SECRET_ACCESS_KEY"]
    )
    # the webhook's key is the user's, not the plan's scrubbed placeholder: signatures verify
    assert got.worker_webhook_secret == SECRETS["WORKER_WEBHOOK_SECRET"]
    assert got.hf_token is None  # the weights' token never reaches the worker


def test_hub_and_bucket_settings_are_typed_fields() -> None:
    s = Settings.from_env(
        base_environ(
            HF_TOKEN=" hf_x ", HF_ENDPOINT="http://127.0.0.1:9", AWS_ENDPOINT_URL="http://127.0.0.1:7"
        )
    )
    assert s.hf_token == "hf_x" and s.hf_endpoint == "http://127.0.0.1:9"
    assert s.aws_endpoint_url == "http://127.0.0.1:7"
    assert Settings.from_env(base_environ()).hf_endpoint == "https://huggingface.co"
    assert "hf_x" not in repr(s)
