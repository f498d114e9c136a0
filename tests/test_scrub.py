"""Secrets never reach a stream bootstrap writes: stderr of run and of the CLI, state/*.json."""

from __future__ import annotations

import io
import json
from pathlib import Path

from bootstrap.timeline import Timeline, read_events, scrub, scrub_data, secret_values
from tests.helpers import base_environ, run_bootstrap

TOKEN = "hf_EchoedBackByTheServer0123456789"


def test_run_error_lines_on_stderr_are_scrubbed(tmp_path: Path) -> None:
    """An error that carries a secret's value (a server echoing the token, here a path holding it)."""
    missing = tmp_path / f"volume-{TOKEN}"
    proc = run_bootstrap(["run"], base_environ(BOOTSTRAP_VOLUME=str(missing), HF_TOKEN=TOKEN), cwd=tmp_path)
    assert proc.returncode == 10, proc.stderr
    assert "error:" in proc.stderr and "volume-***" in proc.stderr
    assert TOKEN not in proc.stderr + proc.stdout


def test_cli_error_lines_on_stderr_are_scrubbed(tmp_path: Path) -> None:
    template = tmp_path / f"{TOKEN}.tmpl"
    proc = run_bootstrap(["render", "--template", str(template)], base_environ(HF_TOKEN=TOKEN), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: template ") and "***" in proc.stderr
    assert TOKEN not in proc.stderr + proc.stdout


def test_urls_and_nested_details_are_scrubbed() -> None:
    assert scrub("GET https://user:p@ss@host/x failed", ()) == "GET https://user:***@host/x failed"
    assert scrub('{"u": "https://u:pw@h/", "e": "a@b"}', ()) == '{"u": "https://u:***@h/", "e": "a@b"}'
    detail = {"error": f"HTTP 401 {TOKEN} rejected", "more": [TOKEN], "code": 13}
    assert json.dumps(scrub_data(detail, (TOKEN,))).count(TOKEN) == 0


def test_a_secret_equal_to_a_number_or_a_flag_leaves_every_event_readable(tmp_path: Path) -> None:
    """CI's environment had a secret-named flag (``TOKENIZERS_PARALLELISM=false``): scrubbing the
    serialized line cut every ``false`` and the boot's env event vanished from its timeline. Strings
    are scrubbed inside the record now, and flags are no secrets."""
    secrets = secret_values({"TOKENIZERS_PARALLELISM": "false", "MY_API_KEY": "1234", "HF_TOKEN": TOKEN})
    assert secrets == (TOKEN, "1234")
    stream = io.StringIO()
    timeline = Timeline("w1", log_format="json", stream=stream, secrets=secrets)
    timeline.attach(tmp_path / "logs")
    timeline.event("env", "end", ms=1234, detail={"reused": False, "path": "/v/1234", "n": 1234, "t": TOKEN})
    timeline.close()
    for text in (stream.getvalue(), (tmp_path / "logs" / "boot.jsonl").read_text()):
        assert TOKEN not in text and "/v/1234" not in text
        (event,) = [json.loads(line) for line in text.splitlines()]
        assert event["ms"] == 1234 and event["detail"] == {
            "reused": False,
            "path": "/v/***",
            "n": 1234,
            "t": "***",
        }
    (event,) = read_events(tmp_path / "logs" / "boot.jsonl")
    assert event["phase"] == "env" and event["detail"]["reused"] is False
