"""Lake maintenance flow: optimize and vacuum the Delta tables, or upgrade a lake in the old layout.

`cbir lake optimize|vacuum|upgrade` runs it (flows/lake_cli.py); `cbir serve` schedules it weekly.
"""

from __future__ import annotations

from prefect import flow

from cbir.lake import RETENTION_HOURS, Lake
from cbir.settings import Settings, load_settings
from jobs import maintenance

SCHEDULE = "30 3 * * 0"  # weekly, Sunday 03:30: compact, then vacuum


@flow(name="lake-maintenance", log_prints=True)
def maintenance_flow(action: str = "optimize+vacuum", table: str | None = None,
                     retention_hours: int = RETENTION_HOURS, settings: Settings | None = None) -> list[dict]:
    """Compact the tables' small files and/or vacuum what no version within the retention needs; or upgrade
    a lake in the pre-Delta layout. One summary table per step."""
    from flows.reporting import publish_summary

    settings = settings or load_settings()
    lake = Lake.open(settings)
    rows: list[dict] = []
    if action == "upgrade":
        rows = maintenance.upgrade(lake)
        publish_summary("lake-upgrade", f"lake {lake.uri} upgraded to Delta tables", rows or [{"table": "none"}])
        lake.check()
        return rows
    lake.check()
    for step in action.split("+"):
        if step == "optimize":
            done = maintenance.optimize(lake, table)
        elif step == "vacuum":
            done = maintenance.vacuum(lake, table, retention_hours)
        else:
            raise ValueError(f"unknown maintenance step {step!r}")
        publish_summary(f"lake-{step}", f"lake {step}", done or [{"table": "none"}])
        rows += [{"step": step, **row} for row in done]
    return rows


@flow(name="lake-maintenance", log_prints=True)
def lake_maintenance(action: str = "optimize+vacuum", table: str | None = None,
                     retention_hours: int = RETENTION_HOURS) -> list[dict]:
    """Compact the lake's tables, then vacuum what no version within the retention needs (settings come from
    the serving process's environment, never from a parameter).

    Args:
        action: optimize, vacuum, or optimize+vacuum
        table: one table (manifest, captions, features/<encoder>-<dtype>), default all
        retention_hours: vacuum keeps what the versions of this many last hours need
    """
    return maintenance_flow.fn(action, table, retention_hours)


def scheduled_maintenance(settings: Settings):
    """The weekly compaction and vacuum, as a deployment of `cbir serve`."""
    return lake_maintenance.to_deployment(name="scheduled-maintenance", cron=SCHEDULE, tags=["cbir"],
                                          parameters={"action": "optimize+vacuum"},
                                          description="compact the lake's small files, then vacuum old ones")
