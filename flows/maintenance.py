"""Lake maintenance flow: compact and vacuum the Delta tables.

`cbir lake optimize|vacuum` runs it; `cbir serve` schedules it on maintenance.schedule.
"""

from __future__ import annotations

from typing import Literal

from cbir.lake import Lake
from cbir.settings import Settings, load_settings
from flows.common import flow
from flows.reporting import publish_summary
from jobs import maintenance

Action = Literal["optimize+vacuum", "optimize", "vacuum"]


@flow(name="lake-maintenance", log_prints=True)
def maintenance_flow(
    action: Action = "optimize+vacuum", table: str | None = None, settings: Settings | None = None
) -> list[dict]:
    """Compact the tables' small files, then vacuum the files no version within maintenance.retention_hours
    needs. One summary table per step.

    Args:
        action: optimize, vacuum, or optimize+vacuum
        table: one table (manifest, captions, features/<encoder>-<dtype>), default all
    """
    settings = settings or load_settings()
    lake = Lake.open(settings)
    lake.check()
    rows: list[dict] = []
    for step in action.split("+"):
        if step == "optimize":
            done = maintenance.optimize(lake, table)
        else:
            done = maintenance.vacuum(lake, table, settings.maintenance.retention_hours)
        publish_summary(f"lake-{step}", f"lake {step}", done or [{"table": "none"}])
        rows += [{"step": step, **row} for row in done]
    return rows
