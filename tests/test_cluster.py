"""cbir cluster: a newcomer starts a standalone master and workers from the installed pyspark."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, free_port_pair


@pytest.mark.slow
def test_cluster_start_status_stop(tmp_path):
    environment = {k: v for k, v in os.environ.items() if k not in ("SPARK_HOME", "CBIR_STATE_DIR")}
    environment["PYTHONPATH"] = str(REPO)  # no SPARK_HOME: cbir cluster finds pyspark's own

    def cbir(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "cli", "--set", f"state_dir={tmp_path}", "cluster", *args]
        return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=180)

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
    assert cbir("status").returncode == 1
