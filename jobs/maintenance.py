"""Lake maintenance: a table's history, compaction (optimize) and vacuum. No Spark: delta-rs does the work.

Each function returns rows (dicts) for the summary table the `cbir lake` verbs print.
"""

from __future__ import annotations

from cbir.errors import UsageError
from cbir.lake import RETENTION_HOURS, Lake, Table


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
