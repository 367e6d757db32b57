"""Values read back from the lake never become paths or predicates unchecked; parts are durable before
a commit names them; a live run's parts survive vacuum; bad tables are refused in one line, untouched."""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import write_deltalake

from cbir.errors import CbirError, UsageError
from cbir.lake import Lake, new_run_id
from cbir.parts import Part
from cbir.schemas import MANIFEST
from cbir.storage import put_bytes
from jobs import index, maintenance
from models import store

from conftest import make_settings


@pytest.fixture
def lake(tmp_path):
    lake = Lake.open(make_settings(tmp_path))
    lake.check()
    return lake


def part(table, run_id: str) -> tuple[str, int]:
    data = {name: [None] for name in MANIFEST.names}
    data.update(uri=["/img/1.jpg"], status=["ok"], run_id=[run_id], ingested_at=[datetime.now(UTC)])
    writer = table.part_writer(run_id)
    writer.write(pa.RecordBatch.from_pydict(data, schema=MANIFEST))
    return writer.close()


def victim(lake) -> str:
    path = lake.path("victim")
    os.makedirs(path)
    open(f"{path}/precious.txt", "w").write("keep me")
    return f"{path}/precious.txt"


@pytest.mark.parametrize(
    "name", ["../../victim/precious.txt", "run-20250101T000000Z-0123abcd/part-x.parquet", "part-x.parquet"]
)
def test_a_commit_names_only_its_own_part_files(lake, name):
    precious = victim(lake)
    table, run_id = lake.table("manifest"), new_run_id()
    with pytest.raises(CbirError, match="is not one of its part files"):
        table.commit(run_id, [Part(name, 1, 10, "{}")])
    assert open(precious).read() == "keep me" and table.state() is None


def test_dropping_a_version_checks_the_version_it_deletes(lake):
    table = lake.table("captions")
    for bad in ("x' OR '1'='1", "../victim"):
        with pytest.raises(CbirError, match="not a run id"):
            index.drop_version(lake, bad)
    assert table.state() is None


@pytest.mark.parametrize("pointer", ["../../../victim", "20250101T000000Z-0123abcd/../../..", "", "x" * 10_000])
def test_the_current_pointer_must_hold_a_version(lake, pointer):
    put_bytes(lake.fs, lake.path("models", "captioner", "current"), pointer.encode(), overwrite=True)
    with pytest.raises(CbirError, match="captioner pointer holds .* is not a run id"):
        store.card(lake)


@pytest.mark.parametrize("version", ["..", "../x", "v1.0", "current/.."])
def test_captioner_version_settings_are_versions(tmp_path, version):
    with pytest.raises(UsageError, match="bad setting captioner.version"):
        make_settings(tmp_path, f"captioner.version={version}")
    assert make_settings(tmp_path, "captioner.version=20250101T000000Z-0123abcd")


def test_query_runs_and_staging_take_run_ids_only(lake):
    for bad in ("..", "../manifest", "a/b"):
        with pytest.raises(CbirError):
            lake.query_tables(bad)
        with pytest.raises(CbirError):
            lake.table("manifest").run_folder(bad)


def test_parts_are_fsynced_before_a_commit_names_them(lake, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: calls.append("rename") or real_replace(a, b))
    put_bytes(lake.fs, lake.path("x", "y.json"), b"{}")
    assert calls[:2] == ["fsync", "rename"] and calls[-1] == "fsync"  # the data, then the folder entry

    table, run_id = lake.table("manifest"), new_run_id()
    calls.clear()
    written = part(table, run_id)
    assert calls == ["fsync"] and written.rows == 1 and written.size > 0


def test_vacuum_keeps_a_live_runs_parts(lake):
    """Parts of a run in flight are in no version yet: vacuum leaves them within the retention (7 days)."""
    table, live, done = lake.table("manifest"), new_run_id(), new_run_id()
    table.commit(done, [part(table, done)])
    in_flight = part(table, live)
    assert table.vacuum() == []
    assert os.path.exists(f"{table.path}/{in_flight.name}")
    table.commit(live, [in_flight])
    assert table.read().num_rows == 2


def _snapshot(folder) -> list[tuple[str, int, float]]:
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime) for p in Path(folder).rglob("*"))


def test_a_folder_of_parquet_files_is_refused_and_left_alone(tmp_path):
    lake = Lake.open(make_settings(tmp_path))
    os.makedirs(f"{lake.root}/manifest")
    pq.write_table(pa.table({"uri": ["a"]}), f"{lake.root}/manifest/data.parquet")
    before = _snapshot(lake.root)
    with pytest.raises(UsageError, match=r"manifest at .* is a folder of Parquet files, not a Delta table"):
        lake.table("manifest").read()
    with pytest.raises(UsageError, match="is a folder of Parquet files, not a Delta table"):
        lake.check()  # every command checks the lake before it starts
    assert _snapshot(lake.root) == before

    plain = Lake.open(make_settings(tmp_path, f"lake={tmp_path}/plain"))
    os.makedirs(plain.root)
    pq.write_table(pa.table({"uri": ["a"]}), f"{plain.root}/part-0.parquet")
    before = _snapshot(plain.root)
    with pytest.raises(UsageError, match="is a folder of Parquet files, not a cbir lake"):
        plain.check()
    assert _snapshot(plain.root) == before


def test_a_delta_table_with_a_foreign_schema_is_refused_and_left_alone(lake):
    write_deltalake(lake.path("captions"), pa.table({"image_id": ["a"], "caption": [1]}))
    before = _snapshot(lake.root)
    table = lake.table("captions")
    foreign = r"captions at .* has a foreign schema \(missing .*uri.*other types for caption"
    with pytest.raises(UsageError, match=foreign):
        table.read()
    run_id = new_run_id()
    with pytest.raises(UsageError, match="foreign schema"):
        lake.check()
    with pytest.raises(UsageError, match="foreign schema"):
        index.drop_version(lake, run_id)
    assert _snapshot(lake.root) == before


def test_a_table_missing_more_than_the_later_columns_is_foreign_and_never_altered(lake):
    """Only the columns cbir added later (ADDED_LATER) may be missing: a table that also lacks another one
    of cbir's is not taken for an older captions table, and no write adds columns to it."""
    from cbir.parts import storage_schema
    from cbir.schemas import CAPTIONS

    kept = [f for f in storage_schema(CAPTIONS) if f.name not in ("visual", "reason")]
    write_deltalake(lake.path("captions"), pa.table({f.name: pa.nulls(1, f.type) for f in kept}))
    before = _snapshot(lake.root)
    table = lake.table("captions")
    with pytest.raises(UsageError, match=r"foreign schema \(missing reason, visual\)"):
        table.read()
    run_id = new_run_id()
    with pytest.raises(UsageError, match="foreign schema"):
        table.commit(run_id, [Part(f"run-{run_id}/part-x.parquet", 1, 10, "{}")])
    assert _snapshot(lake.root) == before


def test_a_delta_table_of_a_newer_protocol_is_refused_and_left_alone(lake):
    table = lake.table("manifest")
    run_id = new_run_id()
    table.commit(run_id, [part(table, run_id)])
    newer = {
        "protocol": {
            "minReaderVersion": 4,
            "minWriterVersion": 8,
            "readerFeatures": ["vacuumProtocolCheck2"],
            "writerFeatures": ["vacuumProtocolCheck2"],
        }
    }
    commit = {"commitInfo": {"timestamp": 1, "operation": "UPGRADE PROTOCOL"}}
    with open(f"{table.path}/_delta_log/{2:020d}.json", "w") as log:
        log.write(json.dumps(commit) + "\n" + json.dumps(newer) + "\n")
    before = _snapshot(lake.root)
    for action in (lambda t: t.read(), lambda t: lake.check(), lambda t: t.optimize(), lambda t: t.vacuum()):
        with pytest.raises(UsageError, match=r"manifest at .* (needs a newer Delta protocol|cannot be read)") as error:
            action(lake.table("manifest"))
        assert "\n" not in str(error.value)
    assert _snapshot(lake.root) == before


def _age(path: str, hours: float) -> None:
    """Set a file's modification time `hours` back: what vacuum's retention is measured against."""
    then = time.time() - hours * 3600
    os.utime(path, (then, then))


def test_a_short_retention_keeps_a_live_runs_parts_and_a_commit_never_names_a_missing_part(lake):
    """maintenance.retention_hours=1 shortens only how long replaced files are kept: parts no version names yet
    (a run in flight) stay 7 days, so a run that staged them 2 hours ago still commits a readable table. A part
    that is gone anyway (by hand) is refused at the commit, which leaves the table as it was."""
    table, done, live = lake.table("manifest"), new_run_id(), new_run_id()
    table.commit(done, [part(table, done)])
    in_flight = part(table, live)
    _age(f"{table.path}/{in_flight.name}", 2)
    dead_run = new_run_id()
    dead = part(table, dead_run)
    _age(f"{table.path}/{dead.name}", 24 * 8)  # a run that died 8 days ago: no run takes that long

    assert maintenance.vacuum(lake, "manifest", retention_hours=1) == [{"table": "manifest", "files removed": 1}]
    assert os.path.exists(f"{table.path}/{in_flight.name}") and not os.path.exists(f"{table.path}/{dead.name}")
    table.commit(live, [in_flight])
    assert lake.table("manifest").read().num_rows == 2

    gone_run = new_run_id()
    gone = part(table, gone_run)
    os.remove(f"{table.path}/{gone.name}")
    state = lake.table("manifest").state()
    with pytest.raises(CbirError, match=rf"run {gone_run} cannot commit: its part {gone.name} is gone") as error:
        lake.table("manifest").commit(gone_run, [gone])
    assert "\n" not in str(error.value)
    assert lake.table("manifest").state() == state and lake.table("manifest").read().num_rows == 2


@pytest.mark.parametrize(
    ("image_id", "image_format"),
    [
        ("../../etc/", "/PASSWD"),
        ("ab" * 32, "/../../../../etc/passwd"),
        ("ab" * 32, "jpeg"),
        ("ab" * 32, None),
        ("AB" * 32, "JPEG"),
        ("ab" * 31, "JPEG"),
        ("../" + "ab" * 31, "PNG"),
        (None, "PNG"),
    ],
)
def test_an_image_path_takes_a_sha256_digest_and_a_stored_format_only(lake, image_id, image_format):
    with pytest.raises(CbirError, match="not a sha256 hex digest|not a stored image format") as error:
        lake.image_path(image_id, image_format)
    assert "\n" not in str(error.value)
    assert lake.image_path("ab" * 32, "MPO") == lake.path("images", "ab", "ab" * 32 + ".jpg")


def test_the_gallery_makes_no_path_of_a_bad_manifest_row(lake):
    """A query run's gallery shows stored images by the manifest's image_id and format: a bad row is skipped."""
    from search.gallery import _image_paths

    good, bad_format = "ab" * 32, "cd" * 32
    rows = {good: "PNG", bad_format: "/../../../../victim", "../victim": "PNG"}
    table, run_id = lake.table("manifest"), new_run_id()
    data = {name: [None] * 3 for name in MANIFEST.names}
    data.update(
        image_id=list(rows),
        format=list(rows.values()),
        uri=[f"/img/{i}.png" for i in range(3)],
        status=["ok"] * 3,
        run_id=[run_id] * 3,
        ingested_at=[datetime.now(UTC)] * 3,
    )
    writer = table.part_writer(run_id)
    writer.write(pa.RecordBatch.from_pydict(data, schema=MANIFEST))
    table.commit(run_id, [writer.close()])
    assert _image_paths(lake, set(rows)) == {good: lake.path("images", "ab", f"{good}.png")}
