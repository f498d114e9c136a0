"""One builder of child environments: isolation, the weights' credentials, the worker's view."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bootstrap.childenv import child_environ
from bootstrap.run import worker_environ
from bootstrap.settings import Settings
from tests.helpers import base_environ

CREDENTIALS = {
    "HF_TOKEN": "hf_weights_only_0123456789",
    "AWS_ACCESS_KEY_ID": "AKIAWEIGHTSONLY",
    "AWS_SECRET_ACCESS_KEY": "weights-only-secret",
    "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
}
UPLOADS = {
    "BUCKET_NAME": "outputs",
    "BUCKET_ACCESS_KEY_ID": "AKIAJOBS",
    "BUCKET_SECRET_ACCESS_KEY": "jobs-secret",
}


def test_the_worker_never_gets_the_weights_credentials(tmp_path: Path) -> None:
    """A job runs inside the worker: HF_TOKEN and AWS_* (s3:// weights only) must not be there."""
    environ = base_environ(
        BOOTSTRAP_VOLUME=str(tmp_path), VIRTUAL_ENV="/elsewhere", PYTHONPATH="/mine", **CREDENTIALS, **UPLOADS
    )
    settings = Settings.from_env(environ)
    env = worker_environ(settings, tmp_path / "plan.json")
    # What the worker really sees, through a real child process.
    out = subprocess.run(
        [sys.executable, "-c", "import json, os; print(json.dumps(dict(os.environ)))"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    seen = json.loads(out)
    assert not {k for k in seen if k in CREDENTIALS or k.startswith("AWS_")}
    assert all(seen[k] == v for k, v in UPLOADS.items())  # job outputs upload with BUCKET_*
    assert "VIRTUAL_ENV" not in seen
    assert seen["PYTHONPATH"].split(os.pathsep) == [str(settings.app_dir), "/mine"]
    assert seen["HF_HUB_OFFLINE"] == "1"


def test_child_environments_are_isolated_and_probes_get_no_secret() -> None:
    base = {
        "PATH": "/bin",
        "VIRTUAL_ENV": "/v",
        "PYTHONHOME": "/h",
        "PYTHONPATH": "/p",
        "MY_API_KEY": "k",
        **CREDENTIALS,
    }
    plain = child_environ(base)
    assert plain == {"PATH": "/bin", "MY_API_KEY": "k"}
    assert child_environ(base, secrets=False) == {"PATH": "/bin"}
    boot = child_environ(base, weights_credentials=True, inherit_pythonpath=True)
    assert boot["HF_TOKEN"] == CREDENTIALS["HF_TOKEN"] and boot["PYTHONPATH"] == "/p"
    assert child_environ(base, pythonpath=["/app"], extra={"X": "1"})["PYTHONPATH"] == "/app"
