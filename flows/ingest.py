"""Ingest flow: a folder, an s3:// prefix or a manifest file -> images in the lake + manifest rows."""

from __future__ import annotations

from prefect import flow

from cbir.lake import Lake
from cbir.settings import Settings, load_settings
from flows.reporting import Progress, publish_summary
from jobs import ingest
from jobs.reader import Listing, Source, resolve_source
from jobs.spark import spark_session


@flow(name="ingest", log_prints=True)
def ingest_flow(source: str, retry_failed: bool = False, settings: Settings | None = None) -> dict:
    """Store every good image of SOURCE once, content-addressed, and record every item in the manifest."""
    settings = settings or load_settings()
    return store_images("ingest", resolve_source(source, settings), settings, retry_failed)


def store_images(kind: str, source: Source | Listing, settings: Settings, retry_failed: bool) -> dict:
    """The ingest job on a source (or a crawl's listing), with the progress and summary artifacts of `kind`."""
    lake = Lake.open(settings)
    lake.check()
    progress = Progress(f"{kind}-progress", f"{kind} {source.uri}")
    with spark_session(settings) as spark:
        summary = ingest.run(spark, lake, settings, source, retry_failed=retry_failed, progress=progress)
    progress.finish()
    publish_summary(f"{kind}-summary", f"{kind} {source.uri} (run {summary.run_id})", summary.rows())
    return summary.as_dict()
