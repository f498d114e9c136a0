"""Secrets never reach a stream bootstrap writes: stderr of run and of the CLI, state/*.json."""

from __future__ import annotations

import json
from pathlib import Path

from bootstrap.timeline import scrub, scrub_data
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
