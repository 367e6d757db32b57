"""Lake maintenance: a table's history, compaction (optimize), vacuum, and the one-time upgrade of a lake
in cbir's pre-Delta layout (_commits/ + run=<id>/) to Delta tables. No Spark: delta-rs does the work.

Each function returns rows (dicts) for the summary table the `cbir lake` verbs print.
"""

from __future__ import annotations

import json
import uuid

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cbir.errors import UsageError
from cbir.lake import PART, RETENTION_HOURS, RUN_ID, Lake, Table
from cbir.parts import Part, part_of, to_storage


def tables(lake: Lake, name: str | None = None, include_queries: bool = False) -> list[Table]:
    """The tables a verb works on: one by name (manifest, captions, features/<encoder>-<dtype>, or features
    for every encoder's), or all of them."""
    found = lake.all_tables(include_queries=include_queries)
    if name is None:
        return found
    chosen = [t for t in found if t.name == name or (name == "features" and t.name.startswith("features/"))]
    if not chosen:
        names = ", ".join(t.name for t in found) or "none yet"
        raise UsageError(f"no table '{name[:80]}' in the lake {lake.uri} (tables: {names})")
    return chosen


def history(lake: Lake, name: str) -> list[dict]:
    """Each version of one table: version, when, operation, run, job, rows, model version."""
    (table,) = tables(lake, name)[:1]
    rows = []
    for entry in table.history():
        metrics = entry.get("operationMetrics") or {}
        rows.append(
            {
                "version": entry["version"],
                "at": entry["at"],
                "operation": entry["operation"],
                "run_id": entry.get("run_id") or "",
                "job": entry.get("job") or "",
                "rows": entry.get("rows", entry.get("deleted_rows", metrics.get("num_deleted_rows", ""))),
                "model_version": entry.get("model_version") or "",
            }
        )
    return rows


def optimize(lake: Lake, name: str | None = None) -> list[dict]:
    """Compact each table's small files (one Delta OPTIMIZE commit per table; the rows do not change)."""
    rows = []
    for table in tables(lake, name):
        metrics = table.optimize()
        rows.append(
            {
                "table": table.name,
                "files removed": metrics.get("numFilesRemoved", 0),
                "files added": metrics.get("numFilesAdded", 0),
            }
        )
    return rows


def vacuum(
    lake: Lake, name: str | None = None, retention_hours: int = RETENTION_HOURS, dry_run: bool = False
) -> list[dict]:
    """Remove the files no version within the retention needs (and old parts of runs that died)."""
    if retention_hours < 1:
        raise UsageError(
            "vacuum needs a retention of at least 1 hour: a run in flight writes parts that no version names yet"
        )
    return [
        {"table": table.name, "files removed": len(table.vacuum(retention_hours, dry_run=dry_run))}
        for table in tables(lake, name)
    ]


def upgrade(lake: Lake) -> list[dict]:
    """Convert each table in the pre-Delta layout into a Delta table, in place: each committed run becomes one
    Delta commit (its record's run id and model version in the commit info), oldest first. Staged (never
    committed) runs are dropped; images and models are not touched. Feature files are rewritten (Delta has
    no float16); other parts are referenced where they are. Safe to rerun after a crash: runs already in the
    Delta log are skipped, and the old commit records go last."""
    rows = []
    for table in lake.legacy_tables(include_queries=True):
        table.upgrading = True
        records = _legacy_records(table)
        delta = table._create()
        done = {entry.get("run_id") for entry in delta.history()}
        converted = 0
        for record in records:
            if record["run_id"] in done:
                continue
            parts = [_legacy_part(table, record["run_id"], name) for name in record["files"]]
            parts = [p for p in parts if p is not None]
            meta = {k: v for k, v in record.items() if k in ("model_version",)}
            table.version = None
            if parts:
                table.commit(
                    record["run_id"], parts, job="upgrade", committed_at=str(record.get("committed_at")), **meta
                )
            if "vector" in table.schema.names:  # its files were rewritten
                _remove(table, f"{table.path}/run={record['run_id']}")
            converted += 1
        for folder in ("_staging", "_commits"):  # the old commit records last: the table is Delta from here on
            _remove(table, f"{table.path}/{folder}")
        rows.append({"table": table.name, "runs converted": converted, "rows": sum(r.get("rows", 0) for r in records)})
    return rows


def _legacy_records(table: Table) -> list[dict]:
    records = []
    for info in table.fs.get_file_info(pafs.FileSelector(f"{table.path}/_commits", allow_not_found=True)):
        if not (info.is_file and info.base_name.endswith(".json") and RUN_ID.fullmatch(info.base_name[:-5])):
            continue
        with table.fs.open_input_stream(info.path) as stream:
            record = json.loads(stream.read())
        files = record.get("files")
        if (
            record.get("run_id") != info.base_name[:-5]
            or not isinstance(files, list)
            or not all(isinstance(f, str) and PART.fullmatch(f) for f in files)
        ):
            raise UsageError(f"{table.name}: the commit record {info.base_name} is not cbir's; nothing was converted")
        records.append(record)
    return sorted(records, key=lambda r: str(r.get("committed_at")))


def _legacy_part(table: Table, run_id: str, name: str) -> Part | None:
    path = f"{table.path}/run={run_id}/{name}"
    if table.fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    data = pq.read_table(path, filesystem=table.fs)
    if "vector" in table.schema.names:  # rewritten in the stored form, into the run's new folder
        stored = to_storage(data.select(table.schema.names).cast(table.schema), table.schema)
        new = f"run-{run_id}/part-{uuid.uuid4().hex[:12]}-upgraded.parquet"
        if _is_local(table):
            table.fs.create_dir(f"{table.path}/run-{run_id}", recursive=True)
        pq.write_table(stored, f"{table.path}/{new}", filesystem=table.fs, compression="zstd")
        return part_of(table, new, stored)
    return part_of(table, f"run={run_id}/{name}", data)


def _is_local(table: Table) -> bool:
    return isinstance(table.fs, pafs.LocalFileSystem)


def _remove(table: Table, path: str) -> None:
    if table.fs.get_file_info(path).type == pafs.FileType.Directory:
        table.fs.delete_dir(path)
