"""Lake maintenance: history, optimize and vacuum keep cbir's rows; a lake in the old layout is refused in one
line until `cbir lake upgrade` converts it, once, losing no committed row and touching no image."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from cbir.errors import UsageError
from cbir.lake import Lake, new_run_id
from cbir.schemas import CAPTIONS, MANIFEST, RESULTS, features_schema
from cbir.storage import put_bytes
from cli.main import main
from jobs import maintenance


def _manifest_rows(run_id: str, n: int, start: int = 0) -> pa.Table:
    data = {name: [None] * n for name in MANIFEST.names}
    data.update(
        uri=[f"/img/{start + i}.jpg" for i in range(n)],
        status=["ok"] * n,
        run_id=[run_id] * n,
        ingested_at=[datetime.now(UTC)] * n,
        image_id=[f"{start + i:064x}" for i in range(n)],
    )
    return pa.Table.from_pydict(data, schema=MANIFEST)


def _commit(table, run_id: str, data: pa.Table, **meta):
    writer = table.part_writer(run_id)
    for batch in data.to_batches():
        writer.write(batch)
    return table.commit(run_id, [writer.close()], **meta)


def _files(lake: Lake) -> list[tuple[str, int]]:
    infos = lake.fs.get_file_info(pafs.FileSelector(lake.root, recursive=True, allow_not_found=True))
    return sorted((i.path, i.size) for i in infos if i.is_file)


def test_history_optimize_and_vacuum_keep_the_rows(settings):
    lake = Lake.open(settings)
    lake.check()
    table = lake.table("manifest")
    runs = [new_run_id() for _ in range(3)]
    for i, run_id in enumerate(runs):
        _commit(lake.table("manifest"), run_id, _manifest_rows(run_id, 2, 10 * i), job="ingest")
    before = sorted(table.read().column("uri").to_pylist())

    history = maintenance.history(lake, "manifest")
    assert [(h["version"], h["operation"], h["run_id"], h["rows"]) for h in history] == [
        (0, "CREATE TABLE", "", ""),
        *[(i + 1, "WRITE", run_id, 2) for i, run_id in enumerate(runs)],
    ]
    assert maintenance.optimize(lake) == [
        {"table": "manifest", "files removed": 3, "files added": 1},
        {"table": "captions", "files removed": 0, "files added": 0},
    ]
    assert maintenance.vacuum(lake, "manifest") == [{"table": "manifest", "files removed": 0}]  # all recent
    with pytest.raises(UsageError, match="retention of at least 1 hour"):
        maintenance.vacuum(lake, "manifest", retention_hours=0)
    with pytest.raises(UsageError, match=r"no table 'nope' .*tables: manifest, captions"):
        maintenance.history(lake, "nope")

    assert (
        len(lake.table("manifest").files()) == 1
        and maintenance.history(lake, "manifest")[-1]["operation"] == "OPTIMIZE"
    )
    assert sorted(lake.table("manifest").read().column("uri").to_pylist()) == before
    frame = pl.scan_delta(table.uri, storage_options=table.storage_options or None).collect()
    assert sorted(frame["uri"].to_list()) == before


def test_cbir_lake_history_prints_the_versions(local_settings, capsys):
    lake = Lake.open(local_settings)
    lake.check()
    run_id = new_run_id()
    _commit(
        lake.table("captions"),
        run_id,
        _captions(run_id, "20250101T000000Z-0123abcd", 3),
        job="index",
        model_version="20250101T000000Z-0123abcd",
    )
    common = ["--set", f"lake={local_settings.lake}", "--set", f"state_dir={local_settings.state_dir}"]

    assert main([*common, "lake", "history", "captions", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rows[-1] == {
        "version": 1,
        "at": rows[-1]["at"],
        "operation": "WRITE",
        "run_id": run_id,
        "job": "index",
        "rows": 3,
        "model_version": "20250101T000000Z-0123abcd",
    }
    assert main([*common, "lake", "history"]) == 2
    assert (
        capsys.readouterr().err.strip() == "cbir: error: cbir lake history needs a TABLE (manifest, captions, "
        "features/<encoder>-<dtype>)"
    )


def _captions(run_id: str, version: str, n: int) -> pa.Table:
    rows = [
        dict(
            image_id=f"{i:064x}",
            uri=f"/img/{i}.jpg",
            caption=f"a caption {i}",
            logprob=-1.0,
            references=[dict(kind="caption", rank=1, text=f"a caption {i}", score=-1.0)],
            model_version=version,
            status="ok",
            error=None,
            indexed_at=datetime.now(UTC),
            run_id=run_id,
        )
        for i in range(n)
    ]
    return pa.Table.from_pylist(rows, schema=CAPTIONS)


def _legacy_run(lake: Lake, table: str, run_id: str, parts: list[pa.Table], staged: bool = False, **meta) -> None:
    """A run as the pre-Delta lake.py left it: run=<id>/part-*.parquet and _commits/<id>.json (or staged only)."""
    folder = lake.path(table, "_staging", run_id) if staged else lake.path(table, f"run={run_id}")
    names = []
    for i, data in enumerate(parts):
        name = f"part-{i:05d}-{run_id[-8:]}.parquet"
        if isinstance(lake.fs, pafs.LocalFileSystem):
            lake.fs.create_dir(folder, recursive=True)
        pq.write_table(data, f"{folder}/{name}", filesystem=lake.fs)
        names.append(name)
    if not staged:
        record = {
            "run_id": run_id,
            "committed_at": datetime.now(UTC).isoformat(),
            "files": names,
            "rows": sum(p.num_rows for p in parts),
            **meta,
        }
        if isinstance(lake.fs, pafs.LocalFileSystem):
            lake.fs.create_dir(lake.path(table, "_commits"), recursive=True)
        with lake.fs.open_output_stream(lake.path(table, "_commits", f"{run_id}.json")) as out:
            out.write(json.dumps(record).encode())


def test_a_lake_in_the_old_layout_is_refused_then_upgraded_once(settings):
    lake = Lake.open(settings)
    version, ingest_a, ingest_b, staged, index_run, query_run = (new_run_id() for _ in range(6))
    manifest_a = [_manifest_rows(ingest_a, 2), _manifest_rows(ingest_a, 2, 2)]
    _legacy_run(lake, "manifest", ingest_a, manifest_a)
    _legacy_run(lake, "manifest", ingest_b, [_manifest_rows(ingest_b, 1, 10)])
    _legacy_run(lake, "manifest", staged, [_manifest_rows(staged, 5, 50)], staged=True)  # never committed
    captions = _captions(index_run, version, 3)
    _legacy_run(lake, "captions", index_run, [captions], model_version=version)
    schema = features_schema(4, "float16")
    vectors = (np.arange(12, dtype=np.float16) / 3).reshape(3, 4)
    features = pa.Table.from_pydict(
        {
            "image_id": [f"{i:064x}" for i in range(3)],
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 4),
            "run_id": [index_run] * 3,
        },
        schema=schema,
    )
    _legacy_run(lake, "features/vgg16-random-float16", index_run, [features])
    results = pa.Table.from_pylist(
        [{"query_id": "q1", "rank": 1, "image_id": "a", "run_id": query_run}], schema=RESULTS
    )
    _legacy_run(lake, f"queries/{query_run}/results", query_run, [results])
    put_bytes(lake.fs, lake.path("images", "ab", "ab.jpg"), b"image bytes")
    before = _files(lake)

    with pytest.raises(UsageError, match=r"old table layout .*run `cbir lake upgrade` once"):
        lake.check()
    with pytest.raises(UsageError, match="old layout"):
        lake.table("manifest").read()
    assert _files(lake) == before  # refused, nothing changed

    rows = maintenance.upgrade(lake)

    assert {r["table"]: r["runs converted"] for r in rows} == {
        "manifest": 2,
        "captions": 1,
        "features/vgg16-random-float16": 1,
        "results": 1,
    }
    lake.check()
    manifest = lake.table("manifest")
    expected = sorted(f"/img/{i}.jpg" for i in (0, 1, 2, 3, 10))
    assert sorted(manifest.read().column("uri").to_pylist()) == expected
    frame = pl.scan_delta(manifest.uri, storage_options=manifest.storage_options or None).collect()
    assert sorted(frame["uri"].to_list()) == expected
    assert [(c["run_id"], c["rows"]) for c in manifest.commits()] == [(ingest_a, 4), (ingest_b, 1)]
    assert [(c["run_id"], c["model_version"]) for c in lake.table("captions").commits()] == [(index_run, version)]
    assert lake.table("captions").read().to_pylist() == captions.to_pylist()
    back = lake.features_table("vgg16-random", 4, "float16").read()
    assert np.array_equal(back.column("vector").combine_chunks().flatten().to_numpy(), vectors.ravel())
    assert lake.query_tables(query_run)[0].read().to_pylist() == results.to_pylist()
    with lake.fs.open_input_stream(lake.path("images", "ab", "ab.jpg")) as stream:
        assert stream.read() == b"image bytes"
    names = {path.rsplit("/", 2)[-2] for path, _ in _files(lake)}
    assert "_commits" not in names and staged not in names
    assert maintenance.upgrade(lake) == []  # once: nothing left to convert


def test_cbir_lake_optimize_and_upgrade_run_the_maintenance_flow(local_settings, prefect_server, capsys):
    lake = Lake.open(local_settings)
    lake.check()
    for i in range(2):
        run_id = new_run_id()
        _commit(lake.table("manifest"), run_id, _manifest_rows(run_id, 2, 10 * i))
    common = ["--set", f"lake={local_settings.lake}", "--set", f"state_dir={local_settings.state_dir}"]

    assert main([*common, "lake", "optimize", "manifest", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rows == [{"step": "optimize", "table": "manifest", "files removed": 2, "files added": 1}]
    assert main([*common, "lake", "upgrade", "--json"]) == 0  # nothing in the old layout: nothing to do
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == []
    assert main([*common, "lake", "upgrade", "manifest"]) == 2
    assert "takes no TABLE" in capsys.readouterr().err
