"""The lake's tables are Delta tables: a run's parts are invisible until its one commit, other tools read
exactly cbir's rows, concurrent commits never duplicate a key, and maintenance keeps the rows."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
from deltalake import DeltaTable

from cbir.lake import Lake, new_run_id
from cbir.parts import Part
from cbir.schemas import MANIFEST
from cbir.storage import put_bytes


def _rows(run_id: str, n: int, start: int = 0) -> pa.RecordBatch:
    now = datetime.now(UTC)
    data = {name: [None] * n for name in MANIFEST.names}
    data.update(
        uri=[f"/img/{start + i}.jpg" for i in range(n)], status=["ok"] * n, run_id=[run_id] * n, ingested_at=[now] * n
    )
    return pa.RecordBatch.from_pydict(data, schema=MANIFEST)


def _part(table, run_id: str, batch: pa.RecordBatch) -> Part:
    writer = table.part_writer(run_id)
    writer.write(batch)
    return writer.close()


def _polars_uris(table) -> list[str]:
    """What Polars reads from the Delta table, knowing nothing of cbir."""
    if table.state() is None:
        return []
    frame = pl.scan_delta(table.uri, storage_options=table.storage_options or None).select("uri").collect()
    return sorted(frame["uri"].to_list())


def _delta_uris(table) -> list[str]:
    """What deltalake -> pyarrow reads."""
    if table.state() is None:
        return []
    delta = DeltaTable(table.uri, storage_options=table.storage_options or None)
    return sorted(delta.to_pyarrow_table(columns=["uri"]).column("uri").to_pylist())


def _all_files(lake: Lake) -> list[tuple[str, int]]:
    infos = lake.fs.get_file_info(pafs.FileSelector(lake.root, recursive=True, allow_not_found=True))
    return sorted((i.path, i.size) for i in infos if i.is_file)


def test_parts_are_invisible_until_their_one_commit(settings):
    lake = Lake.open(settings)
    lake.check()
    table = lake.table("manifest")
    run_id = new_run_id()
    parts = [_part(table, run_id, _rows(run_id, 3, start)) for start in (0, 3)]
    _part(table, run_id, _rows(run_id, 5, 100))  # a failed task attempt: written, never committed

    assert table.files() == [] and table.read().num_rows == 0 and _polars_uris(table) == []

    record = table.commit(run_id, parts, job="ingest")

    expected = sorted(f"/img/{i}.jpg" for i in range(6))
    assert record["rows"] == 6 and len(record["files"]) == 2 and record["version"] == 1
    assert sorted(table.read().column("uri").to_pylist()) == expected
    assert _polars_uris(table) == expected and _delta_uris(table) == expected
    assert [r["run_id"] for r in table.commits()] == [run_id]
    leftovers = lake.fs.get_file_info(pafs.FileSelector(table.run_folder(run_id)))
    assert sorted(i.base_name for i in leftovers) == sorted(p.name.split("/")[1] for p in parts)  # the attempt is gone
    (last,) = [h for h in table.history() if h["operation"] == "WRITE"]
    assert (last["run_id"], last["job"], last["rows"]) == (run_id, "ingest", 6)
    stats = DeltaTable(table.uri, storage_options=table.storage_options or None).get_add_actions(flatten=True)
    assert pa.table(stats).column("num_records").to_pylist() == [3, 3]  # add actions carry statistics


def test_an_aborted_run_leaves_nothing(settings):
    lake = Lake.open(settings)
    lake.check()
    table = lake.table("manifest")
    run_id = new_run_id()
    _part(table, run_id, _rows(run_id, 4))
    table.abort(run_id)
    assert table.read().num_rows == 0 and _all_files(lake) == []
    assert table.commit(new_run_id(), []) is None
    assert table.part_writer(run_id).close() == Part(None, 0)  # no rows, no file


def test_a_commit_keeps_only_keys_no_one_committed_since_it_read(settings):
    """Two ingests of the same uris read the same version; the second to commit drops the uris the first
    committed meanwhile (and keeps its new ones), so each uri is in the table once."""
    lake = Lake.open(settings)
    lake.check()
    seed = new_run_id()
    lake.table("manifest").commit(seed, [_part(lake.table("manifest"), seed, _rows(seed, 1, 99))])
    first, second = lake.table("manifest"), lake.table("manifest")
    first.read(), second.read()  # both pin version 1
    a, b = new_run_id(), new_run_id()
    parts_a = [_part(first, a, _rows(a, 4))]
    parts_b = [_part(second, b, _rows(b, 3)), _part(second, b, _rows(b, 3, 3))]

    assert first.commit(a, parts_a)["rows"] == 4
    record = second.commit(b, parts_b)

    assert record["rows"] == 2 and record["dropped_rows"] == 4
    expected = sorted(f"/img/{i}.jpg" for i in (0, 1, 2, 3, 4, 5, 99))
    assert sorted(lake.table("manifest").read().column("uri").to_pylist()) == expected
    assert _polars_uris(lake.table("manifest")) == expected


def test_racing_commits_each_land_once(settings):
    """Commits started at the same moment from one version: one wins each version, the others retry."""
    lake = Lake.open(settings)
    lake.check()
    tables = [lake.table("manifest") for _ in range(4)]
    runs = [new_run_id() for _ in tables]
    for table in tables:
        table.read()
    parts = [[_part(t, r, _rows(r, 5, 10 * i))] for i, (t, r) in enumerate(zip(tables, runs, strict=True))]
    start = threading.Barrier(len(tables))
    records = {}

    def commit(i):
        start.wait()
        records[i] = tables[i].commit(runs[i], parts[i])

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(len(tables))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(r["version"] for r in records.values()) == [1, 2, 3, 4]
    assert _delta_uris(lake.table("manifest")) == sorted(f"/img/{i}.jpg" for i in range(40) if i % 10 < 5)


def test_float16_vectors_round_trip_and_other_tools_read_them(settings):
    lake = Lake.open(settings)
    lake.check()
    table = lake.features_table("vgg16-random", 6, "float16")
    run_id = new_run_id()
    vectors = np.arange(18, dtype=np.float16).reshape(3, 6) / 7
    batch = pa.RecordBatch.from_pydict(
        {
            "image_id": ["a", "b", "c"],
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 6),
            "run_id": [run_id] * 3,
        },
        schema=table.schema,
    )
    table.commit(run_id, [_part(table, run_id, batch)], job="embed")

    back = lake.features_table("vgg16-random", 6, "float16").read()
    assert back.schema.field("vector").type == pa.list_(pa.float16(), 6)
    assert np.array_equal(back.column("vector").combine_chunks().flatten().to_numpy(), vectors.ravel())
    stored = pl.scan_delta(table.uri, storage_options=table.storage_options or None).sort("image_id").collect()
    assert np.array_equal(np.frombuffer(stored["vector"][1], "<f2"), vectors[1])  # dim little-endian halves


def test_a_delete_naming_dropped_runs_is_one_delta_commit_and_hides_them(settings):
    """What `cbir index --drop-version` does: one Delta delete, whose dropped_runs leave commits()."""
    lake = Lake.open(settings)
    lake.check()
    table = lake.table("manifest")
    first, second = new_run_id(), new_run_id()
    table.commit(first, [_part(table, first, _rows(first, 2))], model_version="v1")
    table.commit(second, [_part(table, second, _rows(second, 3, 10))], model_version="v2")
    assert [(r["run_id"], r["model_version"], r["rows"]) for r in table.commits()] == [
        (first, "v1", 2),
        (second, "v2", 3),
    ]
    assert table.delete(f"run_id = '{first}'", job="drop", dropped_runs=[first]) == 2

    assert [r["run_id"] for r in table.commits()] == [second]
    expected = [f"/img/{i}.jpg" for i in (10, 11, 12)]
    assert sorted(table.read().column("uri").to_pylist()) == expected
    assert _polars_uris(table) == expected
    assert [(h["operation"], h.get("job"), h.get("dropped_runs")) for h in table.history()] == [
        ("CREATE TABLE", None, None),
        ("WRITE", None, None),
        ("WRITE", None, None),
        ("DELETE", "drop", [first]),
    ]


def test_optimize_compacts_and_vacuum_removes_what_no_version_needs(settings):
    lake = Lake.open(settings)
    lake.check()
    table = lake.table("manifest")
    for i in range(4):
        run_id = new_run_id()
        table.commit(run_id, [_part(table, run_id, _rows(run_id, 2, 10 * i))])
    dead = new_run_id()
    dead_part = _part(table, dead, _rows(dead, 3, 500))  # a run killed before its commit
    before = sorted(table.read().column("uri").to_pylist())

    metrics = table.optimize()
    assert metrics["numFilesRemoved"] == 4 and metrics["numFilesAdded"] == 1
    assert len(lake.table("manifest").files()) == 1
    removed = table.vacuum(retention_hours=0)
    assert len(removed) == 4  # the four compacted parts; the dead run's part may be a live run's (for 7 days)
    assert dead_part.name not in removed and lake.fs.get_file_info(f"{table.path}/{dead_part.name}").is_file
    removed = table.vacuum(retention_hours=0, in_flight_hours=0)  # no run is in flight here

    assert dead_part.name in removed and not lake.fs.get_file_info(f"{table.path}/{dead_part.name}").is_file
    assert sorted(lake.table("manifest").read().column("uri").to_pylist()) == before == _polars_uris(table)


def test_put_bytes_writes_once(settings):
    lake = Lake.open(settings)
    lake.check()
    path = lake.image_path("ab" * 32, "JPEG")
    assert path.endswith(f"images/ab/{'ab' * 32}.jpg")
    assert put_bytes(lake.fs, path, b"first") is True
    assert put_bytes(lake.fs, path, b"second") is False
    with lake.fs.open_input_stream(path) as stream:
        assert stream.read() == b"first"
    if settings.lake_is_local:  # no temporary files left beside it
        names = [i.base_name for i in lake.fs.get_file_info(pafs.FileSelector(path.rsplit("/", 1)[0]))]
        assert names == [f"{'ab' * 32}.jpg"]


def test_table_uris_cover_the_contract(settings):
    lake = Lake.open(settings)
    lake.check()
    table = lake.features_table("vgg16-random", 4, "float32")
    run_id = new_run_id()
    batch = pa.RecordBatch.from_pydict(
        {
            "image_id": ["a"],
            "vector": pa.FixedSizeListArray.from_arrays(pa.array([1.0, 2, 3, 4], pa.float32()), 4),
            "run_id": [run_id],
        },
        schema=table.schema,
    )
    table.commit(run_id, [_part(table, run_id, batch)])
    uris = lake.table_uris()
    assert set(uris) >= {
        "manifest",
        "features",
        "captions",
        "models",
        "queries",
        "images",
        "features/vgg16-random-float32",
    }
    assert uris["manifest"] == f"{settings.lake}/manifest" and uris["models"] == f"{settings.lake}/models"
    assert (
        DeltaTable(uris["features/vgg16-random-float32"], storage_options=lake.storage_options or None)
        .to_pyarrow_table()
        .num_rows
        == 1
    )


@pytest.mark.parametrize("table_name", ["manifest", "captions"])
def test_tables_hold_what_polars_reads(settings, table_name):
    """An empty lake's tables do not exist yet: every reader sees no rows, and no folder is made."""
    lake = Lake.open(settings)
    lake.check()
    table = lake.table(table_name)
    assert table.read().num_rows == 0 and table.state() is None and table.commits() == []
    assert _all_files(lake) == []


def test_a_retried_commit_finds_its_run_committed_and_changes_nothing(settings):
    lake = Lake.open(settings)
    lake.check()
    table = lake.table("manifest")
    run_id = new_run_id()
    parts = [_part(table, run_id, _rows(run_id, 2))]
    record = table.commit(run_id, parts)

    assert table.commit(run_id, parts) == record  # the same handle: a flow's retry of its commit task
    again = lake.table("manifest").commit(run_id, [])  # a new handle finds it in the history
    assert (again["run_id"], again["rows"]) == (run_id, 2)
    pinned = lake.table("manifest")
    pinned.version = record["version"] - 1  # a try whose error came after its log entry was written
    assert pinned.commit(run_id, parts)["version"] == record["version"]
    assert table.state().endswith(f"@{record['version']}")
    assert sorted(table.read().column("uri").to_pylist()) == ["/img/0.jpg", "/img/1.jpg"]


def test_a_table_from_before_a_new_column_reads_it_as_null_and_gains_it_on_the_next_write(settings):
    from dataclasses import replace

    from cbir.schemas import CAPTIONS

    lake = Lake.open(settings)
    lake.check()
    current = lake.table("captions")
    older = replace(current, schema=pa.schema([f for f in CAPTIONS if f.name != "visual"]))
    now = datetime.now(UTC)

    def rows(run_id, image_id, **extra):
        row = {name: None for name in older.schema.names}
        row.update(image_id=image_id, model_version=run_id, status="ok", indexed_at=now, run_id=run_id, **extra)
        return pa.RecordBatch.from_pylist([row], schema=pa.schema([*older.schema, *[CAPTIONS.field(k) for k in extra]]))

    first = new_run_id()
    older.commit(first, [_part(older, first, rows(first, "a"))])
    assert lake.table("captions").read(["image_id", "visual"]).to_pylist() == [{"image_id": "a", "visual": None}]

    second = new_run_id()
    current = lake.table("captions")
    current.commit(second, [_part(current, second, rows(second, "b", visual=b"\x00\x3c"))])
    assert "visual" in current.delta().schema().to_arrow().names
    assert sorted(current.read(["image_id", "visual"]).to_pylist(), key=str) == [
        {"image_id": "a", "visual": None},
        {"image_id": "b", "visual": b"\x00\x3c"},
    ]
    frame = pl.scan_delta(current.uri, storage_options=current.storage_options or None).collect()
    assert sorted(frame["visual"].to_list(), key=str) == [None, b"\x00\x3c"]
