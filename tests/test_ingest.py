"""Ingest into a local lake and an S3 lake: every item gets the right row, good images are stored once."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from cbir.errors import UsageError
from cbir.lake import Lake, Table
from cbir.reader import resolve_source
from jobs import ingest
from jobs.job import run as run_job

from conftest import image_bytes, make_settings


@pytest.fixture
def messy_folder(tmp_path) -> tuple[Path, dict[str, tuple[str, str | None]]]:
    """A folder of good and bad files, and the (status, reason) each should get."""
    root = tmp_path / "photos"
    (root / "good").mkdir(parents=True)
    (root / "nested" / "deeper").mkdir(parents=True)
    good_jpg = image_bytes(1)
    good_png = image_bytes(2, fmt="PNG")
    files = {
        "good/a.jpg": (good_jpg, "ok", None),
        "good/b.png": (good_png, "ok", None),
        "nested/deeper/c.gif": (image_bytes(3, fmt="GIF"), "ok", None),
        "z_copy_of_a.jpg": (good_jpg, "duplicate", None),
        "corrupt.png": (_corrupt(good_png), "failed", "corrupt"),
        "truncated.jpg": (image_bytes(4, size=(300, 200))[:3000], "failed", "truncated"),
        "empty.jpg": (b"", "failed", "empty"),
        "notes.txt": (b"these are not the pixels you are looking for\n", "failed", "not-an-image"),
        "huge.png": (image_bytes(5, size=(500, 500), fmt="PNG", noise=True), "failed", "too-large"),
        "wide.png": (image_bytes(6, size=(2000, 1000), fmt="PNG"), "failed", "too-many-pixels"),
        "tiny.ppm": (image_bytes(7, size=(8, 8), fmt="PPM"), "failed", "unsupported-format"),
    }
    for name, (data, _, _) in files.items():
        (root / name).write_bytes(data)
    (root / ".DS_Store").write_bytes(b"\0\1hidden")
    (root / ".thumbs").mkdir()
    (root / ".thumbs" / "a.jpg").write_bytes(good_jpg)
    expected = {str(root / name): (status, reason) for name, (_, status, reason) in files.items()}
    return root, expected


def _corrupt(png: bytes) -> bytes:
    """Damage the compressed pixels, keeping the header intact."""
    start = png.index(b"IDAT") + 20
    return png[:start] + bytes(b ^ 0x5A for b in png[start : start + 40]) + png[start + 40 :]


def _manifest(settings) -> list[dict]:
    return Lake.open(settings).table("manifest").read().to_pylist()


def test_folder_ingest_records_every_item_and_stores_good_images_once(spark, settings, messy_folder):
    root, expected = messy_folder
    lake = Lake.open(settings)
    lake.check()

    summary = run_job(ingest.IngestJob(lake, settings, resolve_source(str(root), settings)), spark)

    rows = {row["uri"]: row for row in _manifest(settings)}
    assert {uri: (row["status"], (row["error"] or "").split(":")[0] or None) for uri, row in rows.items()} == expected
    assert (summary.found, summary.ingested, summary.duplicates, summary.skipped) == (11, 3, 1, 0)
    assert summary.failed == {
        "corrupt": 1,
        "truncated": 1,
        "empty": 1,
        "not-an-image": 1,
        "too-large": 1,
        "too-many-pixels": 1,
        "unsupported-format": 1,
    }
    for uri, row in rows.items():
        data = Path(uri).read_bytes()
        if row["status"] in ("ok", "duplicate"):
            assert row["image_id"] == hashlib.sha256(data).hexdigest()
            path = lake.image_path(row["image_id"], row["format"])
            with lake.fs.open_input_stream(path) as stored:
                assert stored.read() == data
        else:
            assert row["image_id"] is None and row["error"]
    a = rows[str(root / "good/a.jpg")]
    assert (a["format"], a["width"], a["height"], a["bytes"]) == ("JPEG", 64, 48, len(Path(a["uri"]).read_bytes()))
    assert rows[str(root / "nested/deeper/c.gif")]["format"] == "GIF"
    assert {row["run_id"] for row in rows.values()} == {summary.run_id}
    assert {row["source"] for row in rows.values()} == {str(root)}
    stored = lake.fs.get_file_info(pafs.FileSelector(lake.path("images"), recursive=True))
    assert len([info for info in stored if info.is_file]) == 3


def test_rerun_adds_nothing_and_retry_failed_tries_failed_items_again(spark, settings, messy_folder):
    root, expected = messy_folder
    lake = Lake.open(settings)
    lake.check()
    source = resolve_source(str(root), settings)
    first = run_job(ingest.IngestJob(lake, settings, source), spark)
    rows_before = _manifest(settings)

    again = run_job(ingest.IngestJob(lake, settings, source), None)  # the driver knows nothing is new: no Spark needed

    assert (again.found, again.skipped, again.probed) == (first.found, first.found, 0)
    assert _manifest(settings) == rows_before
    assert [r["run_id"] for r in lake.table("manifest").commits()] == [first.run_id]

    (root / "empty.jpg").write_bytes(image_bytes(11))  # the user fixes one file
    retried = run_job(ingest.IngestJob(lake, settings, source, retry_failed=True), spark)
    failed_before = sum(1 for status, _ in expected.values() if status == "failed")
    assert retried.probed == failed_before and retried.ingested == 1
    latest = [r for r in _manifest(settings) if r["run_id"] == retried.run_id and r["uri"].endswith("empty.jpg")]
    assert [r["status"] for r in latest] == ["ok"]


def test_a_failed_commit_leaves_nothing_visible_and_a_rerun_completes(spark, settings, messy_folder, monkeypatch):
    root, expected = messy_folder
    lake = Lake.open(settings)
    lake.check()
    source = resolve_source(str(root), settings)
    original = Table.commit

    def crash(self, run_id, parts, **meta):
        raise RuntimeError("driver lost while committing")

    monkeypatch.setattr(Table, "commit", crash)
    with pytest.raises(RuntimeError):
        run_job(ingest.IngestJob(lake, settings, source), spark)
    assert _manifest(settings) == []
    parts = lake.fs.get_file_info(pafs.FileSelector(lake.path("manifest"), recursive=True, allow_not_found=True))
    assert [info.path for info in parts if info.is_file] == []  # the failed run cleaned up after itself

    monkeypatch.setattr(Table, "commit", original)
    summary = run_job(ingest.IngestJob(lake, settings, source), spark)
    assert summary.probed == len(expected)
    uris = [row["uri"] for row in _manifest(settings)]
    assert sorted(uris) == sorted(expected)


def test_ingest_from_an_s3_prefix_and_a_manifest_with_bad_rows(spark, s3_settings, s3_client, bucket, tmp_path):
    for i in range(4):
        s3_client.put_object(Bucket=bucket, Key=f"incoming/{i}.jpg", Body=image_bytes(100 + i))
    s3_client.put_object(Bucket=bucket, Key="incoming/readme.md", Body=b"# not an image")
    s3_client.put_object(Bucket=bucket, Key="incoming/.hidden/x.jpg", Body=image_bytes(1))
    lake = Lake.open(s3_settings)

    summary = run_job(
        ingest.IngestJob(lake, s3_settings, resolve_source(f"s3://{bucket}/incoming", s3_settings)), spark
    )
    assert (summary.ingested, summary.failed) == (4, {"not-an-image": 1})

    s3_client.put_object(Bucket=bucket, Key="incoming/copy.jpg", Body=image_bytes(100))
    s3_client.put_object(Bucket=bucket, Key="incoming/new.png", Body=image_bytes(200, fmt="PNG"))
    lines = [
        {"uri": "../incoming/copy.jpg", "caption": "a gradient", "title": "zero", "tags": "red, green"},
        {"uri": f"s3://{bucket}/incoming/new.png", "caption": "new one", "tags": ["x", "y"]},
        {"caption": "no uri here"},
        {"uri": "https://example.com/a.jpg"},
        {"uri": "../incoming/missing.jpg"},
        {"uri": "../incoming/1.jpg"},
    ]
    body = "\n".join(json.dumps(line) for line in lines) + "\n{not json\n"
    s3_client.put_object(Bucket=bucket, Key="lists/batch.jsonl", Body=body.encode())

    second = run_job(
        ingest.IngestJob(lake, s3_settings, resolve_source(f"s3://{bucket}/lists/batch.jsonl", s3_settings)), spark
    )

    rows = {row["uri"]: row for row in _manifest(s3_settings) if row["run_id"] == second.run_id}
    manifest_uri = f"s3://{bucket}/lists/batch.jsonl"
    copy = rows[f"s3://{bucket}/incoming/copy.jpg"]
    assert (copy["status"], copy["title"], copy["tags"]) == ("duplicate", "zero", ["red", "green"])
    assert (rows[f"s3://{bucket}/incoming/new.png"]["status"], rows[f"s3://{bucket}/incoming/new.png"]["tags"]) == (
        "ok",
        ["x", "y"],
    )
    assert rows[f"{manifest_uri}#row=3"]["error"] == "bad-row: no uri"
    assert rows["https://example.com/a.jpg"]["error"].startswith("unsupported-uri:")
    assert rows[f"s3://{bucket}/incoming/missing.jpg"]["error"] == "not-found: no such file"
    assert rows[f"{manifest_uri}#row=7"]["error"].startswith("bad-row: line 7 is not JSON")
    assert f"s3://{bucket}/incoming/1.jpg" not in rows
    assert (second.found, second.skipped, second.ingested, second.duplicates) == (7, 1, 1, 1)


def test_manifest_files_carry_captions_titles_and_tags(spark, local_settings, tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(image_bytes(300 + i))
    (folder / "manifest.csv").write_text(
        "uri,caption,title,tags\n"
        "0.jpg,two dogs playing in the water,Dogs,dog water\n"
        f'{folder / "1.jpg"},"a man, a plan",,\n'
        ",no uri,,\n"
        f"{folder},a folder is not an image,,\n"
    )
    lake = Lake.open(local_settings)
    summary = run_job(
        ingest.IngestJob(lake, local_settings, resolve_source(str(folder / "manifest.csv"), local_settings)), spark
    )

    rows = {row["uri"]: row for row in _manifest(local_settings)}
    first = rows[str(folder / "0.jpg")]
    assert (first["caption"], first["title"], first["tags"]) == (
        "two dogs playing in the water",
        "Dogs",
        ["dog", "water"],
    )
    assert rows[str(folder / "1.jpg")]["caption"] == "a man, a plan"
    assert rows[str(folder / "1.jpg")]["title"] is None
    assert rows[f"{folder / 'manifest.csv'}#row=3"]["error"] == "bad-row: no uri"
    assert rows[str(folder)]["error"].startswith("unreadable:")
    assert (summary.ingested, summary.failed) == (2, {"bad-row": 1, "unreadable": 1})


@pytest.mark.parametrize("kind", ["parquet", "txt", "json-array"])
def test_other_manifest_formats(spark, local_settings, tmp_path, kind):
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = []
    for i in range(2):
        path = tmp_path / f"{kind}-{i}.png"
        path.write_bytes(image_bytes(400 + i, fmt="PNG"))
        paths.append(str(path))
    if kind == "parquet":
        manifest = tmp_path / "m.parquet"
        pq.write_table(pa.table({"uri": paths, "caption": ["one", None]}), manifest)
    elif kind == "txt":
        manifest = tmp_path / "m.txt"
        manifest.write_text("# my list\n" + "\n\n".join(paths) + "\n")
    else:
        manifest = tmp_path / "m.json"
        manifest.write_text(json.dumps([{"uri": p, "caption": "one" if i == 0 else None} for i, p in enumerate(paths)]))
    summary = run_job(
        ingest.IngestJob(Lake.open(local_settings), local_settings, resolve_source(str(manifest), local_settings)),
        spark,
    )
    assert (summary.found, summary.ingested, summary.failed) == (2, 2, {})
    if kind != "txt":
        captions = {row["uri"]: row["caption"] for row in _manifest(local_settings)}
        assert captions == {paths[0]: "one", paths[1]: None}


def test_bad_sources_are_usage_errors(local_settings, tmp_path):
    (tmp_path / "list.csv").write_text("path,caption\na.jpg,x\n")
    cases = {
        str(tmp_path / "nope"): "does not exist",
        str(tmp_path / "list.csv"): "source .*list.csv has no 'uri' column (columns: path, caption)",
        "https://example.com/photos": "cbir crawl urls",
        "gs://bucket/x": "only local paths",
    }
    for source, message in cases.items():
        with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
            resolve_source(source, local_settings)


def test_other_tools_read_the_manifest_as_a_delta_table(spark, local_settings, messy_folder):
    import duckdb
    import polars as pl
    from deltalake import DeltaTable

    root, expected = messy_folder
    lake = Lake.open(local_settings)
    summary = run_job(ingest.IngestJob(lake, local_settings, resolve_source(str(root), local_settings)), spark)
    table_dir = lake.path("manifest")

    frame = pl.scan_delta(table_dir).select("uri", "run_id").collect()
    assert sorted(frame["uri"].to_list()) == sorted(expected) and set(frame["run_id"]) == {summary.run_id}
    files = DeltaTable(table_dir).file_uris()  # DuckDB without its delta extension: the version's files
    count = duckdb.sql(f"select count(*) from read_parquet({files!r})").fetchone()[0]
    assert count == len(expected)
    assert sorted(DeltaTable(table_dir).to_pyarrow_table(columns=["uri"]).column("uri").to_pylist()) == sorted(expected)


def test_lake_check_names_a_missing_bucket(tmp_path, s3_endpoint):
    settings = make_settings(
        tmp_path, "lake=s3://no-such-bucket/x", f"s3.endpoint_url={s3_endpoint}", "s3.region=us-east-1"
    )
    with pytest.raises(UsageError, match="bucket 'no-such-bucket' does not exist"):
        Lake.open(settings).check()


def test_two_ingests_of_one_folder_at_once_leave_each_uri_once(spark, settings, messy_folder, monkeypatch):
    """Both runs read the manifest before either commits, so both probe and write every uri; the second
    to commit drops the uris the first committed meanwhile."""
    root, expected = messy_folder
    lake = Lake.open(settings)
    lake.check()
    source = resolve_source(str(root), settings)
    both_read = threading.Barrier(2, timeout=120)
    real = ingest._not_in_manifest

    def read_then_wait(entries, table, retry_failed):
        new = real(entries, table, retry_failed)
        both_read.wait()
        return new

    monkeypatch.setattr(ingest, "_not_in_manifest", read_then_wait)
    summaries, errors = [], []

    def run():
        try:
            summaries.append(run_job(ingest.IngestJob(lake, settings, source), spark))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    [thread.start() for thread in threads]
    [thread.join(timeout=600) for thread in threads]

    assert errors == [] and [s.probed for s in summaries] == [len(expected)] * 2  # both did the work
    uris = [row["uri"] for row in _manifest(settings)]
    assert sorted(uris) == sorted(expected)  # each once
    table = lake.table("manifest")
    writes = [h for h in table.history() if h["operation"] == "WRITE"]
    assert len(writes) == 1 or (len(writes) == 2 and sum(h["rows"] for h in writes) == len(expected))
    import polars as pl

    frame = pl.scan_delta(table.uri, storage_options=table.storage_options or None).select("uri").collect()
    assert sorted(frame["uri"].to_list()) == sorted(expected)
