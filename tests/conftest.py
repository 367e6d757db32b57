"""Shared fixtures: one local Spark session, a moto S3 server on 127.0.0.1, settings for both lakes."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import numpy as np
import pytest
from PIL import Image

from cbir.settings import Settings, load_settings

# Prefect and Keras keep their state out of the home folder, as the cbir command arranges.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # as the cbir command sets it
REPO = Path(__file__).resolve().parents[1]
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


# Tests whose subject is not the encoder use EfficientNet-Lite0 with the ImageNet weights its pip package ships
# (no download): VGG16 costs about three times as much per image and seconds more to build in each process that
# encodes. test_captioner's encoder checks and test_encoders keep VGG16, the default, covered.
LIGHT_ENCODER = ("encoder.name=efficientnet_lite0", "encoder.weights=imagenet")
LIGHT_ENCODER_KEY = "efficientnet_lite0-imagenet"


def make_settings(tmp: Path, *overrides: str) -> Settings:
    defaults = [
        f"lake={tmp}/lake",
        f"state_dir={tmp}/state",
        "spark.master=local[2]",
        "ingest.max_bytes=400000",
        "ingest.max_pixels=1500000",
    ]  # small limits, small test images
    return load_settings(overrides=[*defaults, *overrides], environ={})


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    from jobs.spark import build_session

    session = build_session(make_settings(tmp_path_factory.mktemp("spark")))
    yield session
    session.stop()


MOTO = """
import logging, sys
logging.getLogger("werkzeug").setLevel(logging.ERROR)
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # until the tests end
"""


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server in its own process: delta-rs holds the GIL in some calls (history), which would
    deadlock against a server thread in the test process."""
    os.environ.update(S3_KEYS)
    server = subprocess.Popen([sys.executable, "-c", MOTO], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    port = int(server.stdout.readline())
    yield f"http://127.0.0.1:{port}"
    server.stdin.close()
    server.wait(timeout=30)


@pytest.fixture(scope="session")
def prefect_server():
    """A Prefect server for the whole session (Prefect's test harness, a temporary database)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def cli_environment(prefect_server) -> dict:
    """The environment for a cbir subprocess that reports to the session's Prefect server."""
    from prefect.settings import PREFECT_API_URL

    environ = {k: v for k, v in os.environ.items() if not k.startswith(("CBIR_", "PREFECT_"))}
    return {**environ, "PREFECT_API_URL": PREFECT_API_URL.value()}


def flow_runs(name: str) -> list:
    """The runs of a flow on the session's Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[name])))


def task_runs(flow_run_id) -> dict[str, str]:
    """The task runs of a flow run (its stages): task name -> final state, of the last run of each task."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC,
        )
    return {run.name.rsplit("-", 1)[0]: run.state.type.value for run in runs}


@pytest.fixture(scope="session")
def cluster(tmp_path_factory, s3_endpoint):
    """A standalone Spark cluster of two one-core workers (cbir/cluster.py), shared by the session's tests: its
    start-up is costly. After s3_endpoint, so its daemons (and executors) have the S3 server's keys. It runs in
    STATE/cluster, as `cbir cluster start` does: a cbir driver given state_dir=STATE finds its secret."""
    from cbir.cluster import standalone_cluster

    folder = tmp_path_factory.mktemp("cluster-state") / "cluster"
    with standalone_cluster(folder, workers=2, cores=1, memory="2g") as running:
        yield running


def cluster_state_dir(cluster) -> str:
    """The state_dir of the session's cluster: cbir runs on it with this (and spark.master=its URL)."""
    return str(Path(cluster.folder).parent)


def free_port_pair() -> tuple[int, int]:
    from cbir.cluster import free_port

    return free_port(), free_port()


def cbir_process(environment: dict, cwd: Path, *args: str, overrides: list[str] = ()) -> subprocess.Popen:
    """`cbir ARGS --set ...` from this checkout, its driver in a process group of its own (to kill it whole)."""
    command = [sys.executable, "-m", "cli", *args]
    for item in overrides:
        command += ["--set", item]
    return subprocess.Popen(
        command,
        cwd=cwd,
        env={**environment, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_until(ready, driver: subprocess.Popen, seconds: float = 300) -> None:
    """Poll for the moment to strike at a running cbir process; fail if it ends (or hangs) first."""
    deadline = time.monotonic() + seconds
    while not ready():
        if driver.poll() is not None or time.monotonic() > deadline:
            driver.kill()
            _, err = driver.communicate()
            raise AssertionError(f"the run ended (or hung) before the moment to strike: {err[-3000:]}")
        time.sleep(0.05)


def summary_count(output: str, what: str) -> float:
    """A row's count in a run's printed summary table."""
    match = re.search(rf"│ {re.escape(what)}\s*│\s*([\d.]+)", output)
    assert match, f"no '{what}' row in the summary:\n{output[-3000:]}"
    return float(match.group(1))


@pytest.fixture
def bucket(s3_endpoint) -> str:
    name = f"lake-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_client(s3_endpoint):
    return boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")


@pytest.fixture
def local_settings(tmp_path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def s3_settings(tmp_path, s3_endpoint, bucket) -> Settings:
    return make_settings(tmp_path, *s3_lake(bucket, s3_endpoint))


def s3_lake(bucket: str, endpoint: str) -> tuple[str, ...]:
    """The settings of a lake in the moto server's bucket."""
    return (
        f"lake=s3://{bucket}/lake",
        f"s3.endpoint_url={endpoint}",
        "s3.region=us-east-1",
        "s3.access_key=testing",
        "s3.secret_key=testing",
    )


@pytest.fixture(params=["local", "s3"])
def settings(request) -> Settings:
    """Each test that takes this runs once on a local lake and once on the moto S3 lake."""
    return request.getfixturevalue(f"{request.param}_settings")


def image_bytes(seed: int, size=(64, 48), fmt="JPEG", noise=False) -> bytes:
    """A distinct picture per seed: a colour gradient, or noise that compresses badly."""
    rng = np.random.default_rng(seed)
    if noise:
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    else:
        y, x = np.mgrid[0 : size[1], 0 : size[0]]
        base = rng.integers(0, 256, 3)
        pixels = ((base + np.stack([x * 3, y * 5, x + y], -1)) % 256).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (240, 220, 30)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (250, 250, 250), "black": (10, 10, 10)}


def shapes_dataset(folder: Path, count: int, seed: int = 0) -> list[dict]:
    """Images whose content decides their captions: a coloured shape on a plain background.

    Writes the images and returns rows of uri, caption (five per image, as Flickr8k has) and
    split (every sixth image test, the next dev), so held-out sets do not depend on paths.
    """
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        colour, shape, background = (str(rng.choice(list(options))) for options in (COLOURS, SHAPES, BACKGROUNDS))
        image = Image.new("RGB", (96, 96), BACKGROUNDS[background])
        draw = ImageDraw.Draw(image)
        size = int(rng.integers(36, 60))
        x, y = (int(v) for v in rng.integers(4, 92 - size, 2))
        box = (x, y, x + size, y + size)
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(x + size // 2, y), (x, y + size), (x + size, y + size)], fill=COLOURS[colour])
        path = folder / f"{i:04d}.png"
        image.save(path)
        for caption in (
            f"a {colour} {shape} on a {background} background",
            f"a {colour} {shape}",
            f"{colour} {shape} on {background}",
            f"there is a {colour} {shape} on a {background} background",
            f"a {background} background with a {colour} {shape}",
        ):
            rows.append({"uri": str(path), "caption": caption, "split": ("test", "dev", *["train"] * 4)[i % 6]})
    return rows


def headless_chromium(profile_folder: Path, window: str = "1280,1200"):
    """Headless Chromium driven by the system chromedriver (Debian chromium + chromium-driver: ./run test
    installs them)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.fail(
            "the browser test needs headless Chromium and its driver: apt-get install chromium "
            "chromium-driver (.ci/run installs them)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={window}",
        f"--user-data-dir={profile_folder}/chromium-{uuid.uuid4().hex[:6]}",
    ):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(driver_path), options=options)
