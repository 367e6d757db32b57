"""A standalone Spark cluster on this machine, from the installed pyspark: one master and N workers.

pyspark ships Spark's launch scripts, but `spark-class` fails with `/bin/load-spark-env.sh: No such file`
unless SPARK_HOME names the pyspark folder; the daemons started here get it. The tests, bench/scale.py
and `cbir cluster start|stop|status` share this module. A real cluster starts the same daemons on
other machines (or submits to YARN or Kubernetes); see docs/operations.md.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib.util import find_spec
from pathlib import Path

MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"
EXECUTOR_CLASS = "org.apache.spark.executor.CoarseGrainedExecutorBackend"
STATE_FILE = "cluster.json"


def spark_home() -> str:
    """The installed pyspark folder: it holds bin/spark-class and jars/, as a Spark distribution does."""
    return find_spec("pyspark").submodule_search_locations[0]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Cluster:
    """A running cluster: the master's URL and web UI, and each daemon's process id (its process group)."""

    folder: str
    host: str
    port: int
    ui_port: int
    master_pid: int
    worker_pids: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"spark://{self.host}:{self.port}"

    def state(self) -> dict:
        """The master's view (its web UI's JSON): workers with their state, cores, memory, running apps."""
        with urllib.request.urlopen(f"http://{self.host}:{self.ui_port}/json/", timeout=5) as response:
            return json.load(response)

    def alive_workers(self) -> int:
        try:
            return sum(worker["state"] == "ALIVE" for worker in self.state()["workers"])
        except OSError:
            return 0

    def executor_pids(self, worker: int) -> list[int]:
        """The executor JVMs that worker `worker` (0-based) runs now: its direct children."""
        parent = self.worker_pids[worker]
        return [pid for pid, cmd in processes() if EXECUTOR_CLASS in cmd and parent_of(pid) == parent]

    def kill_executors(self, worker: int) -> list[int]:
        """SIGKILL a worker's executors (their Python workers exit with them): a lost executor, mid-task."""
        pids = self.executor_pids(worker)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return pids

    def save(self) -> None:
        Path(self.folder, STATE_FILE).write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, folder: str | Path) -> Cluster | None:
        path = Path(folder, STATE_FILE)
        return cls(**json.loads(path.read_text())) if path.exists() else None


def start(
    folder: str | Path,
    workers: int = 2,
    cores: int = 1,
    memory: str = "2g",
    port: int = 0,
    ui_port: int = 0,
    host: str = "127.0.0.1",
    wait_s: float = 120,
    pin: bool = False,
) -> Cluster:
    """Start a master and `workers` workers of `cores` cores each, detached; wait until all have registered.
    pin: each worker (and so its executors and their Python workers) runs on `cores` CPUs of its own.
    Unpinned, `cores` only counts task slots: a worker's JVM threads and Python workers use any idle CPU."""
    cpu_sets = worker_cpus(workers, cores) if pin else [None] * workers
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    port, ui_port = port or free_port(), ui_port or free_port()
    master = _daemon(folder, "master", MASTER_CLASS, "--host", host, "--port", str(port), "--webui-port", str(ui_port))
    cluster = Cluster(str(folder), host, port, ui_port, master.pid)
    cluster.save()
    for i in range(workers):
        args = ("--host", host, "--cores", str(cores), "--memory", memory, "--webui-port", "0")
        work = folder / f"worker-{i}"
        args += ("--work-dir", str(work))
        worker = _daemon(folder, f"worker-{i}", WORKER_CLASS, cluster.url, *args, cpus=cpu_sets[i])
        cluster.worker_pids.append(worker.pid)
    cluster.save()
    _wait_for(lambda: cluster.alive_workers() >= workers, wait_s, f"{workers} workers registered at {cluster.url}")
    return cluster


def stop(cluster: Cluster) -> None:
    """Stop the workers (and their executors), then the master; remove the state file."""
    for pid in [*cluster.worker_pids, cluster.master_pid]:
        _stop_group(pid)
    Path(cluster.folder, STATE_FILE).unlink(missing_ok=True)


def worker_cpus(workers: int, cores: int) -> list[set[int]]:
    """Disjoint CPU sets, `cores` each, from the CPUs this process may use."""
    usable = sorted(os.sched_getaffinity(0))
    if workers * cores > len(usable):
        raise ValueError(
            f"pinning {workers} workers of {cores} core(s) each needs {workers * cores} CPUs; this machine lets "
            f"cbir use {len(usable)}"
        )
    return [set(usable[i * cores : (i + 1) * cores]) for i in range(workers)]


@contextmanager
def standalone_cluster(
    folder: str | Path, workers: int = 2, cores: int = 1, memory: str = "2g", pin: bool = False
) -> Iterator[Cluster]:
    cluster = start(folder, workers, cores, memory, pin=pin)
    try:
        yield cluster
    finally:
        stop(cluster)


def daemon_environment() -> dict[str, str]:
    """SPARK_HOME at pyspark (else spark-class fails), 127.0.0.1, and this interpreter for Python workers."""
    return {
        **os.environ,
        "SPARK_HOME": spark_home(),
        "SPARK_LOCAL_IP": os.environ.get("SPARK_LOCAL_IP", "127.0.0.1"),
        "PYSPARK_PYTHON": sys.executable,
    }


def _daemon(folder: Path, name: str, main_class: str, *args: str, cpus: set[int] | None = None) -> subprocess.Popen:
    """A daemon in its own process group (so stopping it stops its executors), logging to FOLDER/NAME.log;
    on `cpus` only, if given (its children inherit the affinity)."""
    command = [str(Path(spark_home(), "bin", "spark-class")), main_class, *args]
    pinned = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    with open(folder / f"{name}.log", "ab") as log:
        return subprocess.Popen(
            command,
            env=daemon_environment(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=pinned,
        )


def _stop_group(pid: int, wait_s: float = 30) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.2)
    if _alive(pid):
        os.killpg(pid, signal.SIGKILL)
    try:
        os.waitpid(pid, os.WNOHANG)  # our own child: reap it
    except ChildProcessError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _wait_for(ready, wait_s: float, what: str) -> None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {wait_s:.0f} s waiting for {what}")


def processes() -> Iterator[tuple[int, str]]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                yield int(entry.name), (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue


def parent_of(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1
