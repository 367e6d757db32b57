"""Eval flow: ingest and index a captioned table's images, then measure retrieval on them."""

from __future__ import annotations

from cbir.settings import Settings
from flows.common import flow, open_lake, run_job, stage
from flows.index import index_flow
from flows.ingest import ingest_flow
from flows.reporting import publish
from jobs import evaluate

read_rows = stage(evaluate.read_table_rows, name="read the table")


@flow(name="eval", log_prints=True)
def eval_flow(table: str, prepare: bool = True, settings: Settings | None = None) -> dict:
    """Text-to-image recall@1/5/10 and image-to-image mAP@10 on TABLE (uri, caption[, category]);
    first ingest and index its images, unless `prepare` is false (the caller just did both)."""
    settings, lake = open_lake(settings)
    rows = read_rows(table, settings)
    if prepare:
        ingest_flow(table, settings=settings)
        index_flow(settings=settings)
    summary = run_job(evaluate.EvalJob(lake, settings, rows), settings)
    return publish("eval", f"retrieval quality on {table}", summary)
