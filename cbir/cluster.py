"""A standalone Spark cluster on this machine, from the installed pyspark: one master and N workers.

pyspark ships Spark's launch scripts, but `spark-class` fails with `/bin/load-spark-env.sh: No such file`
unless SPARK_HOME names the pyspark folder; the daemons started here get it. The tests, bench/scale.py
and `cbir cluster start|stop|status` share this module. A real cluster starts the same daemons on
other machines (or submits to YARN or Kubernetes); see docs/operations.md.

Its daemons authenticate every connection with a secret made for this cluster alone: it lies in FOLDER/spark.conf
(mode 0600), which they read with --properties-file (never on a command line, which any local user may read), and
so does the driver that jobs/spark.py starts on it. The REST submission server stays off.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
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
PROPERTIES_FILE = "spark.conf"  # the daemons' and drivers' Spark properties, the secret among them: mode 0600
SECRET = "spark.authenticate.secret"


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
    # pid -> its start time (clock ticks after boot, /proc/PID/stat): a pid names the daemon started, not a
    # process that got the number after it ended.
    started: dict[str, int] = field(default_factory=dict)

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

    @property
    def properties(self) -> Path:
        """The Spark properties file that the daemons and this cluster's drivers read (the secret among them)."""
        return Path(self.folder, PROPERTIES_FILE)

    def secret(self) -> str:
        for line in self.properties.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == SECRET:
                return value.strip()
        raise ValueError(f"{self.properties} holds no {SECRET}")

    def daemons(self) -> list[tuple[str, int, str]]:
        """(name, pid, main class) of each daemon, the workers first."""
        workers = [(f"worker-{i}", pid, WORKER_CLASS) for i, pid in enumerate(self.worker_pids)]
        return [*workers, ("master", self.master_pid, MASTER_CLASS)]

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
    allow_remote: bool = False,
) -> Cluster:
    """Start a master and `workers` workers of `cores` cores each, detached; wait until all have registered.
    pin: each worker (and so its executors and their Python workers) runs on `cores` CPUs of its own.
    Unpinned, `cores` only counts task slots: a worker's JVM threads and Python workers use any idle CPU.
    allow_remote: listen on `host` even if it is not a loopback address (else ValueError)."""
    if not allow_remote and not is_loopback(host):
        raise ValueError(
            f"--host {host} is not a loopback address: the cluster would be reachable from the network "
            "(set spark.cluster_allow_remote=true to allow it)"
        )
    cpu_sets = worker_cpus(workers, cores) if pin else [None] * workers
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    port, ui_port = port or free_port(), ui_port or free_port()
    cluster = Cluster(str(folder), host, port, ui_port, master_pid=0)
    _write_private(cluster.properties, daemon_properties(secrets.token_hex(32)))
    properties = ("--properties-file", str(cluster.properties))
    master_args = ("--host", host, "--port", str(port), "--webui-port", str(ui_port), *properties)
    cluster.master_pid = _daemon(folder, "master", MASTER_CLASS, *master_args).pid
    cluster.started[str(cluster.master_pid)] = start_ticks(cluster.master_pid)
    cluster.save()
    for i in range(workers):
        args = ("--host", host, "--cores", str(cores), "--memory", memory, "--webui-port", "0", *properties)
        work = folder / f"worker-{i}"
        args += ("--work-dir", str(work))
        worker = _daemon(folder, f"worker-{i}", WORKER_CLASS, cluster.url, *args, cpus=cpu_sets[i])
        cluster.worker_pids.append(worker.pid)
        cluster.started[str(worker.pid)] = start_ticks(worker.pid)
    cluster.save()
    _wait_for(lambda: cluster.alive_workers() >= workers, wait_s, f"{workers} workers registered at {cluster.url}")
    return cluster


def stop(cluster: Cluster) -> list[str]:
    """Stop the workers (and their executors), then the master; remove the state and properties files.
    A pid that no longer names the daemon started (it ended, and the number may be another process's now)
    is not signalled: the returned lines say which, empty when each daemon was stopped."""
    stale = []
    for name, pid, main_class in cluster.daemons():
        if not _alive(pid):  # (and reaped, if it was our child)
            stale.append(f"{name} (pid {pid}) has ended")
        elif is_daemon(pid, cluster.started.get(str(pid)), main_class, cluster.folder):
            _stop_group(pid)
        else:
            stale.append(f"{name} (pid {pid}) is another process now, left alone")
    Path(cluster.folder, STATE_FILE).unlink(missing_ok=True)
    cluster.properties.unlink(missing_ok=True)
    return stale


def is_loopback(host: str) -> bool:
    """Whether `host` (an address, or a name: each address it resolves to) is a loopback address."""
    try:
        addresses = [host] if _is_address(host) else [info[4][0] for info in socket.getaddrinfo(host, None)]
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(address.split("%")[0]).is_loopback for address in addresses)


def exposure(host: str) -> str:
    """What listening on `host` (not a loopback address) exposes, in one line."""
    return (
        f"listening on {host}, the master's and workers' ports are open to the network: each connection needs "
        "the cluster's secret but travels unencrypted, and a web UI (no login) too if SPARK_LOCAL_IP is not loopback"
    )


def daemon_properties(secret: str) -> str:
    """Authentication on, with this cluster's secret; no REST submission server; no kill buttons in the web UIs."""
    return f"spark.authenticate=true\n{SECRET}={secret}\nspark.master.rest.enabled=false\nspark.ui.killEnabled=false\n"


def start_ticks(pid: int) -> int | None:
    """A process's start time, in clock ticks after boot (field 22 of /proc/PID/stat); None if it is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def is_daemon(pid: int, ticks: int | None, main_class: str, folder: str) -> bool:
    """Whether `pid` is still the daemon started: the same start time (when recorded; state files written
    before it was are checked by command line alone) and a command line of its class and cluster folder."""
    if ticks is not None and start_ticks(pid) != ticks:
        return False
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return main_class.encode() in command and any(folder.encode() in part for part in command)


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


def _write_private(path: Path, text: str) -> None:
    """A new file that only this user may read (0600), whatever the umask or was there before."""
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    return True


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
