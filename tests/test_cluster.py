"""cbir cluster: a newcomer starts a standalone master and workers from the installed pyspark."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from cbir.cluster import MASTER_CLASS, Cluster, processes

from conftest import REPO, cluster_state_dir, free_port_pair


def cbir_in(state_dir, *args: str, settings: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`cbir --set state_dir=STATE_DIR ARGS` from this checkout."""
    environment = {k: v for k, v in os.environ.items() if k not in ("SPARK_HOME", "CBIR_STATE_DIR")}
    environment["PYTHONPATH"] = str(REPO)  # no SPARK_HOME: cbir cluster finds pyspark's own
    command = [sys.executable, "-m", "cli", "--set", f"state_dir={state_dir}"]
    for setting in settings:
        command += ["--set", setting]
    return subprocess.run([*command, *args], env=environment, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_cluster_start_status_stop(tmp_path):
    def cbir(*args: str) -> subprocess.CompletedProcess:
        return cbir_in(tmp_path, "cluster", *args)

    port, ui_port = free_port_pair()
    too_many = cbir("start", "--pin", "--workers", str(len(os.sched_getaffinity(0)) + 1))
    assert too_many.returncode == 2 and "CPUs" in too_many.stderr and not (tmp_path / "cluster").exists()
    started = cbir("start", "--pin", "--workers", "1", "--port", str(port), "--ui-port", str(ui_port))
    try:
        assert started.returncode == 0, started.stderr
        worker = json.loads((tmp_path / "cluster" / "cluster.json").read_text())["worker_pids"][0]
        assert os.sched_getaffinity(worker) == {min(os.sched_getaffinity(0))}  # pinned, its executors with it
        assert started.stdout.strip().splitlines()[-1] == f"spark://127.0.0.1:{port}"
        assert "spark.master=spark://127.0.0.1:" in started.stderr
        again = cbir("start")
        assert again.returncode == 2 and "already runs" in again.stderr
        status = cbir("status")
        assert json.loads(status.stdout) == {"master": f"spark://127.0.0.1:{port}", "workers": 1, "cores": 1}
    finally:
        stopped = cbir("stop")
    assert stopped.returncode == 0 and f"stopped spark://127.0.0.1:{port}" in stopped.stderr
    assert "stale" not in stopped.stderr and not (tmp_path / "cluster" / "spark.conf").exists()
    assert not [cmd for _, cmd in processes() if MASTER_CLASS in cmd and str(tmp_path) in cmd]  # the master ended
    assert cbir("status").returncode == 1


def listening_ports(pid: int) -> set[int]:
    """The TCP ports that process `pid` listens on (its sockets in /proc/net/tcp and tcp6, state LISTEN)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def rpc_reply(port: int, body: bytes) -> bytes:
    """Send one Spark RPC request (frame length, type 3, request id, body length, body) as a client that
    knows no secret, and read the answer frame."""
    frame = struct.pack(">qbqi", 8 + 1 + 8 + 4 + len(body), 3, 42, len(body)) + body
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(frame)
        reply = b""
        while len(reply) < 8 or len(reply) < struct.unpack(">q", reply[:8])[0]:
            chunk = connection.recv(65536)
            if not chunk:
                break
            reply += chunk
    return reply


def test_the_master_serves_no_submissions_and_answers_no_client_without_the_secret(cluster):
    """No REST submission server (it ran code for any local user or web page that POSTed a driver to
    :6066): the master listens on its port and its web UI only; and a connection that does not authenticate
    with the cluster's secret gets no further than the authentication (cbir's own drivers: test_index.py)."""
    master_log = Path(cluster.folder, "master.log").read_text()
    assert "REST server" not in master_log
    assert listening_ports(cluster.master_pid) == {cluster.port, cluster.ui_port}
    reply = rpc_reply(cluster.port, b"RegisterApplication from a stranger")
    assert reply[8] == 5 and b"Expected SaslMessage" in reply  # an RpcFailure: it asks for SASL first


def test_the_cluster_s_secret_is_in_its_0600_properties_file_only(cluster):
    """The daemons read the secret from a file only this user may read; it is on no command line (every
    local user may read those), in no log, not in cluster.json, and `cbir info` does not show it."""
    folder = Path(cluster.folder)
    secret = Cluster.load(folder).secret()
    assert len(secret) == 64 and (folder / "spark.conf").stat().st_mode & 0o777 == 0o600
    assert folder.stat().st_mode & 0o777 == 0o700
    leaks = [path for path in folder.rglob("*") if path.is_file() and secret.encode() in path.read_bytes()]
    assert leaks == [folder / "spark.conf"]
    assert not [pid for pid, cmd in processes() if secret in cmd]
    info = cbir_in(cluster_state_dir(cluster), "info", "--json")
    assert info.returncode == 0 and secret not in info.stdout + info.stderr


@pytest.mark.slow
def test_a_host_that_is_not_loopback_is_refused_unless_a_setting_allows_it(tmp_path):
    too_many = str(len(os.sched_getaffinity(0)) + 1)  # refused before anything starts, either way
    refused = cbir_in(tmp_path, "cluster", "start", "--host", "0.0.0.0", "--pin", "--workers", too_many)
    assert refused.returncode == 2 and not (tmp_path / "cluster").exists()
    assert refused.stderr.strip().splitlines() == [
        "cbir: error: --host 0.0.0.0 is not a loopback address: the cluster would be reachable from the network "
        "(set spark.cluster_allow_remote=true to allow it)"
    ]
    allowed = cbir_in(
        tmp_path,
        *("cluster", "start", "--host", "0.0.0.0", "--pin", "--workers", too_many),
        settings=("spark.cluster_allow_remote=true",),
    )
    exposed, error = allowed.stderr.strip().splitlines()
    assert exposed.startswith("cbir cluster: listening on 0.0.0.0, the master's and workers' ports are open")
    assert allowed.returncode == 2 and "CPUs" in error  # past the host's check: the pinning is refused


@pytest.mark.slow
def test_stop_leaves_alone_a_process_that_took_a_stale_state_file_s_pid(tmp_path):
    """cluster.json outlived its cluster, and its master's pid is another process's now (here a sleep, in a
    process group of its own): `cbir cluster stop` signals no process group it did not start."""
    stranger = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        folder = tmp_path / "cluster"
        folder.mkdir()
        port, ui_port = free_port_pair()
        Cluster(str(folder), "127.0.0.1", port, ui_port, stranger.pid).save()
        stopped = cbir_in(tmp_path, "cluster", "stop")
        assert stranger.poll() is None  # alive
        assert stopped.returncode == 0 and stopped.stderr.strip().splitlines() == [
            f"the state in {folder}/cluster.json was stale: master (pid {stranger.pid}) is another process now, "
            "left alone"
        ]
        assert not (folder / "cluster.json").exists()
    finally:
        stranger.kill()
        stranger.wait()
