"""Index: every ok image captioned once per model version, incremental, safe to interrupt, on a real cluster too."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from cbir.cluster import parent_of
from cbir.cluster import processes as cluster_processes
from cbir.errors import UsageError
from cbir.lake import Lake, new_run_id
from cbir.reader import resolve_source
from cbir.schemas import MANIFEST
from jobs import index, ingest, train
from jobs.job import run as run_job
from models import store
from models.captioner import Decoding
from models.encoding import encoder_config, read_features
from search.searcher import search_one

from conftest import (
    LIGHT_ENCODER,
    LIGHT_ENCODER_KEY,
    cbir_process,
    cluster_state_dir,
    make_settings,
    s3_lake,
    shapes_dataset,
    summary_count,
    wait_until,
)

SMALL_MODEL = (
    *LIGHT_ENCODER,
    "captioner.units=64",
    "captioner.embedding_dim=32",
    "captioner.min_word_count=1",
    "train.epochs=20",
    "train.learning_rate=0.01",
    "encoder.batch_size=4",
)


def prepare(spark, settings, tmp: Path, new_images: int = 30) -> dict:
    """Train a small captioner on 24 shapes, then ingest new images plus 6 of the training ones."""
    lake = Lake.open(settings)
    lake.check()
    rows = shapes_dataset(tmp / "train", 24, seed=1)
    with open(tmp / "train.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["uri", "caption", "split"])
        writer.writeheader()
        writer.writerows(rows)
    card = run_job(train.TrainJob(lake, settings, str(tmp / "train.csv")), spark)
    shapes_dataset(tmp / "new", new_images, seed=2)
    for path in sorted((tmp / "train").glob("*.png"))[:6]:
        (tmp / "new" / f"seen-{path.name}").write_bytes(path.read_bytes())
    summary = run_job(ingest.IngestJob(lake, settings, resolve_source(str(tmp / "new"), settings)), spark)
    assert summary.ingested == new_images + 6
    return {"lake": lake, "card": card}


def captions_of(lake: Lake, version: str | None = None) -> list[dict]:
    rows = lake.table("captions").read().to_pylist()
    return [row for row in rows if version is None or row["model_version"] == version]


def stored_images(lake: Lake) -> dict[str, str]:
    """image_id -> path in the lake's image store, for the manifest's ok images."""
    rows = lake.table("manifest").read(["image_id", "format", "status"]).to_pylist()
    return {r["image_id"]: lake.image_path(r["image_id"], r["format"]) for r in rows if r["status"] == "ok"}


def add_manifest_rows(lake: Lake, formats: dict[str, str]) -> None:
    """Commit "ok" manifest rows of these image ids and formats, as a writer of the lake could (uri /bad/<id>)."""
    run_id, n = new_run_id(), len(formats)
    data = {name: [None] * n for name in MANIFEST.names}
    data.update(
        image_id=list(formats),
        format=list(formats.values()),
        uri=[f"/bad/{image_id}" for image_id in formats],
        status=["ok"] * n,
        run_id=[run_id] * n,
        ingested_at=[datetime.now(UTC)] * n,
    )
    table = lake.table("manifest")
    writer = table.part_writer(run_id)
    writer.write(pa.RecordBatch.from_pydict(data, schema=MANIFEST))
    table.commit(run_id, [writer.close()], job="ingest")


@pytest.fixture(scope="module")
def prepared_local(spark, tmp_path_factory):
    """A local lake with a trained captioner and 36 ingested images, prepared once."""
    tmp = tmp_path_factory.mktemp("prepared")
    settings = make_settings(tmp, *SMALL_MODEL)
    return settings, prepare(spark, settings, tmp)["card"], tmp


@pytest.fixture
def fresh_local(prepared_local, tmp_path):
    """A copy of the prepared lake that a test may index and change."""
    settings, card, source = prepared_local
    shutil.copytree(settings.lake, tmp_path / "lake")
    settings = settings.model_copy(update={"lake": str(tmp_path / "lake")})
    return settings, {"lake": Lake.open(settings), "card": card}, source


@pytest.fixture
def fresh_s3(prepared_local, s3_endpoint, s3_client, bucket, tmp_path):
    """The prepared lake, uploaded to a bucket of the test's own on the moto S3 server."""
    settings, card, source = prepared_local
    for path in Path(settings.lake).rglob("*"):
        if path.is_file():
            s3_client.upload_file(str(path), bucket, f"lake/{path.relative_to(settings.lake)}")
    settings = make_settings(tmp_path, *SMALL_MODEL, *s3_lake(bucket, s3_endpoint))
    return settings, {"lake": Lake.open(settings), "card": card}, source


def test_index_captions_each_image_once_as_the_captioner_would(spark, fresh_local):
    settings, prepared, source = fresh_local
    lake, card = prepared["lake"], prepared["card"]
    images = stored_images(lake)
    broken, missing = sorted(images)[:2]
    with lake.fs.open_output_stream(images[broken]) as out:
        out.write(b"\x89PNG\r\n\x1a\n damaged after ingest")
    lake.fs.delete_file(images[missing])
    # Manifest rows whose id or format is not cbir's: the first would read an image outside the lake's store.
    (Path(settings.lake).parent / "victim.png").write_bytes(Path(images[sorted(images)[2]]).read_bytes())
    bad = {"../victim": "PNG", "ab" * 32: "/../../../../victim.png"}
    add_manifest_rows(lake, bad)

    summary = run_job(index.IndexJob(lake, settings), spark)

    assert (summary.pending, summary.indexed, summary.reused) == (38, 34, 6)
    assert summary.encoded == 28
    assert summary.failed == {"decode-failed": 1, "not-found": 1, "bad-manifest-row": 2}  # one bad row, not the run
    assert all(summary.stages[stage] > 0 for stage in ("read", "decode", "encode", "caption", "write"))
    rows = captions_of(lake, card["version"])
    assert sorted(row["image_id"] for row in rows) == sorted([*images, *bad])  # each image exactly once
    by_id = {row["image_id"]: row for row in rows}
    assert by_id[broken]["status"] == "failed" and by_id[broken]["error"].startswith("decode-failed:")
    assert by_id[missing]["error"] == "not-found: the image is not in the lake's image store"
    assert by_id["../victim"]["error"] == "bad-manifest-row: image id '../victim' is not a sha256 hex digest"
    assert by_id["ab" * 32]["reason"] == "bad-manifest-row" and "'/../../../../victim.png'" in by_id["ab" * 32]["error"]
    assert by_id["../victim"]["uri"] == "/bad/../victim" and by_id["../victim"]["status"] == "failed"
    assert_captions_are_the_captioners(lake, settings, [row for row in rows if row["status"] == "ok"], card["version"])
    assert_neighbours_are_the_training_texts(rows, source)

    again = run_job(index.IndexJob(lake, settings), None)  # the driver knows nothing is pending: no Spark needed
    assert (again.pending, again.indexed) == (0, 0)
    assert len(lake.table("captions").commits()) == 1


def assert_captions_are_the_captioners(lake: Lake, settings, ok: list[dict], version: str) -> None:
    """Each caption is what the captioner says of that image alone, from its stored features; its n best
    distinct captions, then its sure enough ImageNet labels, are its references."""
    captioner, _ = store.load(lake, encoder=LIGHT_ENCODER_KEY)
    vectors = read_features(lake, encoder_config(settings, 1), [row["image_id"] for row in ok])
    for row in ok:
        best = captioner.decode(vectors[row["image_id"]][None, :], Decoding.from_settings(settings.captioner))[0]
        (caption, logprob) = best[0]
        assert (row["caption"], row["logprob"]) == (caption, pytest.approx(logprob, abs=1e-4))
        captions = [(r["kind"], r["rank"], r["text"]) for r in row["references"] if r["kind"] == "caption"]
        assert captions == [("caption", rank, text) for rank, (text, _) in enumerate(best, start=1)]
        labels = [r for r in row["references"] if r["kind"] == "label"]
        assert len(labels) <= settings.captioner.labels_per_image
        assert all(r["score"] >= settings.captioner.label_threshold for r in labels)
        assert row["uri"].endswith(".png") and row["model_version"] == version
    assert len({row["caption"] for row in ok}) > 1


def assert_neighbours_are_the_training_texts(rows: list[dict], source: Path) -> None:
    """Neighbours are training (and dev) images' first captions, nearest first; a training image seen again
    is not its own neighbour (its text would answer for it)."""
    with open(source / "train.csv", newline="") as handle:
        first = {}
        for row in csv.DictReader(handle):
            first.setdefault(Path(row["uri"]).name, (row["caption"], row["split"]))
    remembered = {caption for caption, split in first.values() if split != "test"}
    for row in rows:
        near = [r for r in row["references"] or [] if r["kind"] == "neighbour"]
        assert row["status"] != "ok" or 1 <= len(near) <= 5
        assert [r["rank"] for r in near] == list(range(1, len(near) + 1)) and {r["text"] for r in near} <= remembered
        assert [r["score"] for r in near] == sorted((r["score"] for r in near), reverse=True)
        name = Path(row["uri"]).name
        if row["status"] == "ok" and name.startswith("seen-"):
            assert all(r["score"] < 0.999 for r in near)


def test_a_new_version_keeps_the_old_captions_until_dropped(spark, fresh_local):
    settings, prepared, _ = fresh_local
    lake, first = prepared["lake"], prepared["card"]["version"]
    run_job(index.IndexJob(lake, settings), spark)
    captioner, card = store.load(lake)
    second = store.save(lake, captioner, card)  # a new version (the same weights), made current

    summary = run_job(index.IndexJob(lake, settings), spark)

    assert summary.version == second and summary.encoded == 0 and summary.reused == 36  # features are reused
    assert len(captions_of(lake, first)) == len(captions_of(lake, second)) == 36
    assert index.drop_version(lake, first) == (1, 36)
    assert captions_of(lake, first) == [] and len(captions_of(lake, second)) == 36


def test_no_model_is_one_clear_line(spark, local_settings):
    with pytest.raises(UsageError, match=r"no captioner in the lake .* train one with `cbir train DATASET`"):
        run_job(index.IndexJob(Lake.open(local_settings), local_settings), spark)


def test_a_run_whose_tasks_fail_leaves_nothing_and_the_rerun_completes(spark, fresh_local):
    settings, prepared, _ = fresh_local
    lake = prepared["lake"]
    settings = settings.model_copy(update={"encoder": settings.encoder.model_copy(update={"batch_size": 1})})
    outcome: dict = {}

    def run_index():
        try:
            outcome["summary"] = run_job(index.IndexJob(lake, settings), spark)
        except Exception as exc:  # noqa: BLE001 - the failure is what this test wants
            outcome["error"] = exc

    runner = threading.Thread(target=run_index)
    runner.start()
    deadline = time.monotonic() + 120
    while not _run_folders(lake, "captions") and time.monotonic() < deadline and runner.is_alive():
        time.sleep(0.02)
    killed = _kill_python_workers()
    runner.join(timeout=300)

    assert killed and "error" in outcome, "the run should have failed when a task's Python worker died"
    assert captions_of(lake) == [] and lake.table("captions").commits() == []
    assert not _run_folders(lake, "captions")  # the failed run removed its parts

    summary = run_job(index.IndexJob(lake, settings), spark)
    assert summary.indexed == 36
    assert sorted(row["image_id"] for row in captions_of(lake)) == sorted(stored_images(lake))


def on_cluster(cluster, settings) -> list[str]:
    """The --set overrides of a cbir run on the cluster over the test's S3 lake."""
    return [
        f"lake={settings.lake}",
        f"s3.endpoint_url={settings.s3.endpoint_url}",
        "s3.region=us-east-1",
        f"spark.master={cluster.url}",
        f"state_dir={cluster_state_dir(cluster)}",  # where the driver finds the cluster's secret
        "spark.ui=false",
        *SMALL_MODEL,
    ]


@pytest.mark.slow
def test_a_killed_driver_then_a_lost_executor_leave_each_image_captioned_once(
    spark, cluster, fresh_s3, tmp_path, cli_environment
):
    """cbir index over the S3 lake, its driver killed mid-run (with a local master: what a killed run leaves
    is the commit protocol's, whatever runs the tasks); the rerun, on a standalone cluster of two workers,
    loses one worker's executor mid-run and completes."""
    settings, prepared, _ = fresh_s3
    lake, version = prepared["lake"], prepared["card"]["version"]
    local = [*on_cluster(cluster, settings), "spark.master=local[2]"]  # the last --set wins
    driver = cbir_process(cli_environment, tmp_path, "index", overrides=local)
    wait_until(lambda: _run_folders(lake, "captions"), driver)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver's Python and its JVM
    driver.wait(timeout=60)
    assert captions_of(lake) == []  # nothing of the killed run is visible
    killed_runs = _run_folders(lake, "captions")

    rerun = cbir_process(cli_environment, tmp_path, "index", overrides=on_cluster(cluster, settings))
    wait_until(lambda: _run_folders(lake, "captions") - killed_runs and cluster.executor_pids(1), rerun)
    killed = cluster.kill_executors(1)  # worker 1's executor, mid-run: its running task fails
    out, err = rerun.communicate(timeout=600)

    assert killed and rerun.returncode == 0, err[-3000:]
    assert summary_count(out + err, "indexed") == 36 and summary_count(out + err, "tasks retried") >= 1
    rows = captions_of(lake)
    assert sorted(row["image_id"] for row in rows) == sorted(stored_images(lake))  # each image exactly once
    assert len(lake.table("captions").commits()) == 1  # committed once
    features = encoder_config(settings, 1).table(lake).read(["image_id"])["image_id"].to_pylist()
    assert len(features) == len(set(features))  # and no image's features twice
    assert all(row["status"] == "ok" and row["caption"] is not None for row in rows)
    assert_captions_are_the_captioners(lake, settings, rows, version)  # what local[*] gives: the captioner's
    again = run_job(
        index.IndexJob(lake, settings), spark
    )  # a rerun (here in local mode) on the S3 lake finds nothing new
    assert (again.pending, again.indexed) == (0, 0) and len(lake.table("captions").commits()) == 1

    # The query job on the cluster answers as one process does (cbir search): the same images, ranks, scores.
    texts = sorted({row["caption"] for row in rows})[:3] + ["a small red circle"]
    asked = tmp_path / "q.jsonl"
    asked.write_text("".join(json.dumps({"query_id": f"q{i}", "text": t, "k": 5}) + "\n" for i, t in enumerate(texts)))
    remote = cbir_process(cli_environment, tmp_path, "query", str(asked), overrides=on_cluster(cluster, settings))
    out, err = remote.communicate(timeout=600)
    assert remote.returncode == 0, err[-3000:]
    results = lake.query_tables(out.strip().splitlines()[-1].rstrip("/").rsplit("/", 1)[-1])[0].read().to_pylist()
    answered = sorted((r["query_id"], r["rank"], r["image_id"], r["score"]) for r in results)
    in_process = [
        (f"q{i}", hit["rank"], hit["image_id"], hit["score"])
        for i, text in enumerate(texts)
        for hit in search_one(lake, settings, 5, text=text)[1]
    ]
    assert answered == sorted(in_process) and len(answered) == 5 * len(texts)


def _run_folders(lake: Lake, table: str) -> set[str]:
    """The run-<id>/ folders holding parts in the table: runs in flight (in no version yet), or committed."""
    infos = lake.fs.get_file_info(pafs.FileSelector(lake.path(table), recursive=True, allow_not_found=True))
    return {info.path.rsplit("/", 2)[-2] for info in infos if info.is_file and "/run-" in info.path}


def _kill_python_workers() -> bool:
    """SIGKILL the Python workers that Spark's daemon forked, busy ones included: their tasks fail.
    The daemon itself lives on, so later jobs in this session get new workers."""
    ours = {os.getpid()}  # only this test session's Spark: descendants of this process
    processes = list(cluster_processes())
    parents = {pid: parent_of(pid) for pid, _ in processes}
    for _ in range(4):  # pytest -> JVM -> daemon -> worker
        ours |= {pid for pid, parent in parents.items() if parent in ours}
    spark_pythons = {pid for pid, cmd in processes if "pyspark.daemon" in cmd and pid in ours}
    workers = [pid for pid in spark_pythons if parents[pid] in spark_pythons]
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    return bool(workers)


def _features_ids(lake: Lake, settings) -> list[str]:
    return encoder_config(settings, 1).table(lake).read(["image_id"]).column("image_id").to_pylist()


@pytest.mark.parametrize("where", ["s3"])  # the costliest lake; test_lake races commits on both
def test_two_index_runs_at_once_caption_each_image_once(spark, where, request, monkeypatch):
    """Both runs find the same pending images (neither has committed) and caption them all; the second to
    commit drops the (image_id, version) keys and features the first committed meanwhile."""
    settings, prepared, _ = request.getfixturevalue(f"fresh_{where}")
    lake, version = prepared["lake"], prepared["card"]["version"]
    both_read = threading.Barrier(2, timeout=300)
    real = index.pending

    def pending_then_wait(*args, **kwargs):
        todo = real(*args, **kwargs)
        both_read.wait()
        return todo

    monkeypatch.setattr(index, "pending", pending_then_wait)
    summaries, errors = [], []

    def run():
        try:
            summaries.append(run_job(index.IndexJob(lake, settings), spark))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    [thread.start() for thread in threads]
    [thread.join(timeout=900) for thread in threads]

    assert errors == [] and [s.pending for s in summaries] == [36, 36]  # both captioned every image
    ids = [row["image_id"] for row in captions_of(lake, version)]
    assert sorted(ids) == sorted(stored_images(lake))  # each exactly once
    features = _features_ids(lake, settings)
    assert len(features) == len(set(features))
    captions = lake.table("captions")
    import polars as pl

    frame = pl.scan_delta(captions.uri, storage_options=captions.storage_options or None).collect()
    assert frame.group_by("image_id", "model_version").len()["len"].max() == 1 and frame.height == 36
    monkeypatch.setattr(index, "pending", real)
    assert run_job(index.IndexJob(lake, settings), None).pending == 0


class Killed(BaseException):
    """The driver dies here: no exception handler of the run runs (abort included)."""


@pytest.mark.parametrize("where", ["s3"])
def test_a_run_killed_at_each_point_of_its_commit_then_rerun_captions_each_image_once(
    spark, where, request, monkeypatch
):
    from cbir.lake import Table

    settings, prepared, _ = request.getfixturevalue(f"fresh_{where}")
    lake, version = prepared["lake"], prepared["card"]["version"]
    monkeypatch.setattr(Table, "abort", lambda self, run_id: None)  # a killed driver cleans nothing up
    real_commit, real_cleanup = Table.commit, Table._remove_uncommitted

    def killed_before(table_name):
        def commit(self, run_id, parts, **meta):
            if self.name.startswith(table_name):
                raise Killed(f"killed before committing {table_name}")
            return real_commit(self, run_id, parts, **meta)

        return commit

    # 1. every part written, nothing committed; 2. features committed, captions not
    for point in ("features", "captions"):
        monkeypatch.setattr(Table, "commit", killed_before(point))
        with pytest.raises(Killed):
            run_job(index.IndexJob(lake, settings), spark)
        assert captions_of(lake) == []
    # 3. both committed, killed before its own clean-up (and before it could report)
    monkeypatch.setattr(Table, "commit", real_commit)
    monkeypatch.setattr(Table, "_remove_uncommitted", lambda *args: (_ for _ in ()).throw(Killed("after commit")))
    with pytest.raises(Killed):
        run_job(index.IndexJob(lake, settings), spark)
    monkeypatch.setattr(Table, "_remove_uncommitted", real_cleanup)

    again = run_job(index.IndexJob(lake, settings), spark)

    assert again.pending == 0
    ids = [row["image_id"] for row in captions_of(lake, version)]
    assert sorted(ids) == sorted(stored_images(lake))
    features = _features_ids(lake, settings)
    assert len(features) == len(set(features))
    assert len(lake.table("captions").commits()) == 1
    captions = lake.table("captions")
    assert captions.vacuum(retention_hours=0, in_flight_hours=0)  # the killed runs' parts: in no version, removed
    assert sorted(row["image_id"] for row in captions_of(lake, version)) == sorted(stored_images(lake))
