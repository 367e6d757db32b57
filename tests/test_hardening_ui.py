"""cbir ui: the Prefect server it starts answers its own UI's origin only and wants CSRF tokens, so a
page on another site cannot list or run deployments on it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from cli.main import ui_environment

from conftest import make_settings


def call(
    url: str, method: str = "GET", origin: str | None = None, body: dict | None = None, headers: dict | None = None
):
    request = urllib.request.Request(
        url,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={
            **({"Origin": origin} if origin else {}),
            **(headers or {}),
            **({"Content-Type": "application/json"} if body is not None else {}),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers


@pytest.fixture(scope="module")
def prefect_ui(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = make_settings(tmp, "ui.allowed_origins=https://ops.example.org", "ui.trusted_hosts=ops.example.org")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    environ.update(
        PREFECT_HOME=str(tmp / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        **ui_environment(settings, "127.0.0.1", port),
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "cli.ui_server", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=environ,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 180
    while not (_up(port) and call(f"{base}/api/health")[0] == 200):
        assert server.poll() is None and time.monotonic() < deadline, "the Prefect server did not start"
        time.sleep(0.5)
    yield base
    server.terminate()
    server.wait(30)


def _up(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_another_origin_is_refused_and_state_changes_need_a_csrf_token(prefect_ui):
    evil = "http://evil.example"
    status, headers = call(
        f"{prefect_ui}/api/deployments/filter",
        "OPTIONS",
        evil,
        headers={"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"},
    )
    assert headers.get("Access-Control-Allow-Origin") is None  # the browser will not send the call
    status, headers = call(f"{prefect_ui}/api/health", origin=evil)
    assert headers.get("Access-Control-Allow-Origin") is None  # nor let the page read an answer
    # A "simple" cross-origin POST is sent without asking first: CSRF protection refuses it.
    status, _ = call(f"{prefect_ui}/api/deployments/filter", "POST", evil, body={})
    assert status == 403
    status, _ = call(f"{prefect_ui}/api/flow_runs/filter", "POST", body={})  # no token, same site or not
    assert status == 403


@pytest.mark.parametrize("origin", ["http://127.0.0.1:{port}", "http://localhost:{port}", "https://ops.example.org"])
def test_the_uis_own_origin_and_allowed_ones_may_call(prefect_ui, origin):
    origin = origin.format(port=prefect_ui.rsplit(":", 1)[1])
    status, headers = call(f"{prefect_ui}/api/health", origin=origin)
    assert status == 200 and headers.get("Access-Control-Allow-Origin") == origin


@pytest.mark.parametrize(
    "host, served",
    [
        ("127.0.0.1", True),
        ("localhost", True),
        ("ops.example.org", True),
        ("evil.example", False),
        ("rebound.attacker.test", False),
    ],
)
def test_only_known_host_names_are_served(prefect_ui, host, served):
    status, _ = call(f"{prefect_ui}/api/health", headers={"Host": host})
    assert (status == 200) == served and (served or status == 400)


def test_prefect_clients_still_work_with_csrf_on(prefect_ui):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def deployments():
        async with get_client() as client:
            return await client.read_deployments()

    import asyncio

    with temporary_settings({PREFECT_API_URL: f"{prefect_ui}/api"}):
        assert asyncio.run(deployments()) == []


def test_origins_are_checked(tmp_path):
    from cbir.errors import UsageError

    with pytest.raises(UsageError, match="ui.allowed_origins"):
        make_settings(tmp_path, "ui.allowed_origins=*")
