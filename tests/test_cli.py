"""The cbir command as a user runs it: exit codes, one-line errors, info --json, ingest, demo and ui."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


CBIR = str(Path(sys.executable).parent / "cbir")


def run(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("CBIR_", "PREFECT_"))}
    return subprocess.run([CBIR, *args], cwd=cwd, env={**environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def test_info_json_shows_settings_with_secrets_masked_and_every_table(tmp_path):
    result = run("--profile", "s3", "--set", "lake=s3://team-bucket/cbir", "info", "--json", cwd=tmp_path,
                 env={"CBIR_S3__SECRET_KEY": "hush-hush", "CBIR_S3__ACCESS_KEY": "AKIAINFO"})
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
        (["--set", "spark.partitions=lots", "info"], 2, "cbir: error: bad setting spark.partitions='lots' (from --set)"),
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


@pytest.mark.slow
def test_demo_runs_ephemerally_and_keeps_its_runs_in_the_state_folder(tmp_path):
    result = run("demo", "--set", "spark.master=local[2]", cwd=tmp_path)  # no PREFECT_API_URL: as a new user

    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "│ ingested" in output and "│ found in source" in output
    assert (tmp_path / ".cbir" / "prefect" / "prefect.db").is_file()  # the temporary server's database stays
    import pyarrow.dataset as ds

    manifest = ds.dataset(str(tmp_path / ".cbir" / "lake" / "manifest"), format="parquet").to_table().to_pylist()
    captions = {row["title"]: row["caption"] for row in manifest}
    assert captions["astronaut"] == "Color image of the astronaut Eileen Collins."
    assert len(captions) >= 20 and all(row["status"] != "failed" for row in manifest)


@pytest.mark.slow
def test_ui_serves_prefect_with_its_database_in_the_state_folder(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("CBIR_", "PREFECT_"))}
    server = subprocess.Popen([CBIR, "ui", "--port", str(port)], cwd=tmp_path, env=environ,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        health = _wait_for(f"http://127.0.0.1:{port}/api/health", seconds=120)
        assert health == "true"
        page = _wait_for(f"http://127.0.0.1:{port}/", seconds=10)
        assert "<html" in page.lower()
        assert (tmp_path / ".cbir" / "prefect" / "prefect.db").is_file()
    finally:
        server.terminate()
        server.wait(timeout=30)


def _wait_for(url: str, seconds: int) -> str:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
