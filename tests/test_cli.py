"""The cbir command as a user runs it: exit codes, one-line errors, info --json (the demo, ui and serve:
test_demo.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CBIR = str(Path(sys.executable).parent / "cbir")


def run(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("CBIR_", "PREFECT_"))}
    return subprocess.run(
        [CBIR, *args], cwd=cwd, env={**environ, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )


def test_info_json_shows_settings_with_secrets_masked_and_every_table(tmp_path):
    result = run(
        "--profile",
        "s3",
        "--set",
        "lake=s3://team-bucket/cbir",
        "info",
        "--json",
        cwd=tmp_path,
        env={"CBIR_S3__SECRET_KEY": "hush-hush", "CBIR_S3__ACCESS_KEY": "AKIAINFO"},
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["settings"]["lake"] == "s3://team-bucket/cbir"
    assert info["settings"]["s3"]["secret_key"] == "**********"
    assert "hush-hush" not in result.stdout + result.stderr and "AKIAINFO" not in result.stdout
    assert info["tables"]["manifest"] == "s3://team-bucket/cbir/manifest"
    assert {"manifest", "features", "captions", "models", "queries"} <= set(info["tables"])


@pytest.mark.parametrize(
    "args, code, message",
    [
        (
            ["--set", "spark.partitions=lots", "info"],
            2,
            "cbir: error: bad setting spark.partitions='lots' (from --set)",
        ),
        (["info", "--set", "nope=1"], 2, "cbir: error: unknown setting 'nope' (from --set)"),
        (["ingest", "/no/such/folder"], 2, "cbir: error: source /no/such/folder does not exist"),
        (["ingest", "https://example.com/x.jpg"], 2, "cbir: error: source https://example.com/x.jpg: web addresses"),
        (["train", "/no/such/captions.csv"], 2, "cbir: error: data set /no/such/captions.csv does not exist"),
        (["launch"], 2, "invalid choice: 'launch'"),
    ],
)
def test_bad_usage_exits_2_with_one_line(tmp_path, args, code, message):
    result = run(*args, cwd=tmp_path)
    assert result.returncode == code
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("cbir: error")]) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["serve"], "cbir: error: no Prefect server answers at http://127.0.0.1:9/api: start `cbir ui` first"),
        (["serve", "--tags", "kitten"], "cbir: error: crawl flickr needs flickr.api_key and flickr.api_secret"),
        (["serve", "--set", "index.schedule=daily"], "cbir: error: bad setting index.schedule='daily' (from --set)"),
    ],
)
def test_serve_says_what_it_lacks_before_serving(tmp_path, args, message):
    result = run(*args, cwd=tmp_path, env={"PREFECT_API_URL": "http://127.0.0.1:9/api"})
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
