"""Lake maintenance: history, optimize and vacuum keep cbir's rows; `cbir lake` runs them."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import polars as pl
import pyarrow as pa
import pytest

from cbir.errors import UsageError
from cbir.lake import Lake, new_run_id
from cbir.schemas import CAPTIONS, MANIFEST
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


def test_cbir_lake_optimize_and_vacuum_run_the_maintenance_flow(local_settings, prefect_server, capsys):
    lake = Lake.open(local_settings)
    lake.check()
    for i in range(2):
        run_id = new_run_id()
        _commit(lake.table("manifest"), run_id, _manifest_rows(run_id, 2, 10 * i))
    common = ["--set", f"lake={local_settings.lake}", "--set", f"state_dir={local_settings.state_dir}"]

    assert main([*common, "lake", "optimize", "manifest", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rows == [{"step": "optimize", "table": "manifest", "files removed": 2, "files added": 1}]
    assert main([*common, "lake", "vacuum", "--json"]) == 0  # the compaction's inputs are recent: kept
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rows == [
        {"step": "vacuum", "table": "manifest", "files removed": 0},
        {"step": "vacuum", "table": "captions", "files removed": 0},
    ]
    assert sorted(lake.table("manifest").read().column("uri").to_pylist()) == [f"/img/{i}.jpg" for i in (0, 1, 10, 11)]
