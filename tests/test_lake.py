"""The lake's commit protocol: staged parts are invisible, commits are all-or-none, crashes roll forward."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from cbir.lake import READY, Lake, new_run_id, put_bytes
from cbir.schemas import MANIFEST


def _rows(run_id: str, n: int, start: int = 0) -> pa.RecordBatch:
    now = datetime.now(UTC)
    data = {name: [None] * n for name in MANIFEST.names}
    data.update(
        uri=[f"/img/{start + i}.jpg" for i in range(n)], status=["ok"] * n, run_id=[run_id] * n, ingested_at=[now] * n
    )
    return pa.RecordBatch.from_pydict(data, schema=MANIFEST)


def _part(table, run_id: str, batch: pa.RecordBatch) -> tuple[str, int]:
    writer = table.part_writer(run_id)
    writer.write(batch)
    return writer.close()


def _plain_uris(lake: Lake) -> list[str]:
    """What a reader that knows nothing of cbir sees: every Parquet file pyarrow discovers."""
    dataset = ds.dataset(lake.path("manifest"), filesystem=lake.fs, format="parquet", partitioning="hive")
    if not dataset.files:
        return []
    return sorted(dataset.to_table(columns=["uri"]).column("uri").to_pylist())


def test_staged_parts_are_invisible_until_commit(settings):
    lake = Lake.open(settings)
    lake.check()
    table = lake.table("manifest")
    run_id = new_run_id()
    parts = [_part(table, run_id, _rows(run_id, 3, start)) for start in (0, 3)]
    _part(table, run_id, _rows(run_id, 5, 100))  # a failed task attempt: written, never committed

    assert table.files() == [] and table.read().num_rows == 0
    assert _plain_uris(lake) == []

    record = table.commit(run_id, parts)

    assert record["rows"] == 6 and len(record["files"]) == 2
    assert sorted(table.read().column("uri").to_pylist()) == sorted(f"/img/{i}.jpg" for i in range(6))
    assert _plain_uris(lake) == sorted(f"/img/{i}.jpg" for i in range(6))
    assert table.committed_runs() == {run_id}
    leftovers = lake.fs.get_file_info(pafs.FileSelector(lake.path("manifest", "_staging"), allow_not_found=True))
    assert leftovers == []


def test_an_aborted_run_leaves_nothing(settings):
    lake = Lake.open(settings)
    lake.check()
    table = lake.table("manifest")
    run_id = new_run_id()
    _part(table, run_id, _rows(run_id, 4))
    table.abort(run_id)
    assert table.read().num_rows == 0 and _plain_uris(lake) == []
    assert table.commit(new_run_id(), []) is None
    assert table.part_writer(run_id).close() == (None, 0)  # no rows, no file


def test_a_commit_interrupted_after_its_decision_is_rolled_forward(settings):
    lake = Lake.open(settings)
    lake.check()
    table = lake.table("manifest")
    run_id = new_run_id()
    parts = [_part(table, run_id, _rows(run_id, 2, start)) for start in (0, 2)]
    # The driver wrote its decision, then died before publishing.
    table._write_json(f"{table.staging(run_id)}/{READY}", {"run_id": run_id, "files": [p for p, _ in parts], "rows": 4})
    if not settings.lake_is_local:  # on S3 it had copied one part of two
        table.fs.copy_file(f"{table.staging(run_id)}/{parts[0][0]}", f"{table.path}/run={run_id}/{parts[0][0]}")
    assert table.read().num_rows == 0  # no commit record yet: cbir readers see nothing

    later = new_run_id()
    table.commit(later, [_part(table, later, _rows(later, 1, 50))])  # the next writer recovers first

    assert table.committed_runs() == {run_id, later}
    assert sorted(table.read().column("uri").to_pylist()) == sorted(f"/img/{i}.jpg" for i in (0, 1, 2, 3, 50))
    assert _plain_uris(lake) == sorted(f"/img/{i}.jpg" for i in (0, 1, 2, 3, 50))


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
    uris = Lake.open(settings).table_uris()
    assert set(uris) >= {"manifest", "features", "captions", "models", "queries", "images"}
    assert uris["manifest"] == f"{settings.lake}/manifest" and uris["models"] == f"{settings.lake}/models"


def test_commit_records_keep_metadata_and_dropped_runs_vanish(settings):
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

    table.drop_runs([first])

    assert table.committed_runs() == {second}
    assert sorted(table.read().column("uri").to_pylist()) == [f"/img/{i}.jpg" for i in (10, 11, 12)]
    assert _plain_uris(lake) == [f"/img/{i}.jpg" for i in (10, 11, 12)]


def test_a_commit_is_idempotent_and_rows_from_before_reasons_read_without_one(settings):
    lake = Lake.open(settings)
    lake.check()
    table = lake.table("manifest")
    before = replace(table, schema=pa.schema([field for field in MANIFEST if field.name != "reason"]))
    run_id = new_run_id()
    record = before.commit(run_id, [_part(before, run_id, _rows(run_id, 2).select(before.schema.names))])

    assert table.commit(run_id, []) == record  # a retried commit finds the run committed and changes nothing
    assert table.read(["uri", "reason"]).to_pylist() == [
        {"uri": "/img/0.jpg", "reason": None},
        {"uri": "/img/1.jpg", "reason": None},
    ]
