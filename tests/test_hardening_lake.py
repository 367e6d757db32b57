"""Values read back from the lake never become paths unchecked; renames are durable; a live run's
staging is not taken for abandoned."""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime

import pyarrow as pa
import pytest

import cbir.lake
from cbir.errors import CbirError, UsageError
from cbir.lake import READY, Lake, heartbeat, new_run_id, put_bytes
from cbir.schemas import MANIFEST
from jobs import index
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
    "record",
    [
        {"run_id": "../../victim", "files": []},
        {"run_id": "../../victim", "files": ["part-x.parquet"]},
        {"run_id": "20250101T000000Z-0123abcd", "files": ["../../../victim/precious.txt"]},
        {"run_id": None, "files": []},
    ],
)
def test_a_planted_ready_record_cannot_move_or_delete_outside_its_table(lake, record):
    precious = victim(lake)
    table = lake.table("manifest")
    staging = f"{table.path}/_staging/20250101T000000Z-0123abcd"
    os.makedirs(staging)
    open(f"{staging}/{READY}", "w").write(json.dumps(record))
    with pytest.raises(CbirError, match="not a run id|not part files"):
        table.commit(new_run_id(), [part(table, new_run_id())])  # every commit first recovers
    assert open(precious).read() == "keep me"


def test_dropping_a_version_checks_the_run_ids_its_records_name(lake):
    precious = victim(lake)
    captions = lake.table("captions")
    os.makedirs(f"{captions.path}/_commits")
    record = {
        "run_id": "../victim",
        "committed_at": "2025-01-01T00:00:00+00:00",
        "files": [],
        "rows": 1,
        "model_version": "20250101T000000Z-0123abcd",
    }
    open(f"{captions.path}/_commits/20250101T000000Z-0123abcd.json", "w").write(json.dumps(record))
    with pytest.raises(CbirError, match="not a run id"):
        index.drop_version(lake, "20250101T000000Z-0123abcd")
    assert open(precious).read() == "keep me"


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
            lake.table("manifest").staging(bad)


def test_files_are_fsynced_before_the_rename_that_publishes_them(lake, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: calls.append("rename") or real_replace(a, b))
    put_bytes(lake.fs, lake.path("x", "y.json"), b"{}")
    assert calls[:2] == ["fsync", "rename"] and calls[-1] == "fsync"  # the data, then the folder entry

    table, run_id = lake.table("manifest"), new_run_id()
    parts = [part(table, run_id)]
    calls.clear()

    class Recording:  # pyarrow's filesystems cannot be patched: one that notes its renames
        def __getattr__(self, name):
            return getattr(lake.fs, name)

        def move(self, source, target):
            calls.append("rename")
            lake.fs.move(source, target)

    monkeypatch.setattr(cbir.lake, "is_local", lambda fs: True)
    table.fs = Recording()
    table.commit(run_id, parts)
    staged_rename = calls.index("rename", calls.index("rename") + 1)  # after the _ready.json record's own
    assert calls[staged_rename - 1] == "fsync" and calls.count("fsync") >= 4  # record, part, folder, parent


def test_a_live_runs_staging_is_not_aborted_however_old_its_files(lake):
    table, live = lake.table("manifest"), new_run_id()
    with heartbeat([table], live, every_s=0.05):
        part(table, live)
        day_ago = time.time() - 2 * 24 * 3600
        for name in os.listdir(table.staging(live)):
            if name.startswith("part-"):
                os.utime(f"{table.staging(live)}/{name}", (day_ago, day_ago))
        time.sleep(0.2)
        other = new_run_id()
        table.commit(other, [part(table, other)])  # recovers first: the live run's staging stays
        assert any(name.startswith("part-") for name in os.listdir(table.staging(live)))

    dead = new_run_id()
    part(table, dead)
    for name in os.listdir(table.staging(dead)):
        os.utime(f"{table.staging(dead)}/{name}", (day_ago, day_ago))
    os.utime(table.staging(dead), (day_ago, day_ago))
    table.commit(new_run_id(), [])
    assert not os.path.exists(table.staging(dead))  # no heartbeat: abandoned
