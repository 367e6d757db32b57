"""Ingest flow: a folder, an s3:// prefix or a manifest file -> images in the lake + manifest rows."""

from __future__ import annotations

from cbir.reader import Listing, Source, resolve_source
from cbir.settings import Settings, load_settings
from flows.common import flow, open_lake, run_job
from flows.reporting import publish
from jobs import ingest


@flow(name="ingest", log_prints=True)
def ingest_flow(source: str, retry_failed: bool = False, settings: Settings | None = None) -> dict:
    """Store every good image of SOURCE once, content-addressed, and record every item in the manifest."""
    settings = settings or load_settings()
    return store_images("ingest", resolve_source(source, settings), settings, retry_failed)


def store_images(kind: str, source: Source | Listing, settings: Settings, retry_failed: bool) -> dict:
    """The ingest job's stages on a source (or a crawl's listing), with the progress and summary artifacts of `kind`."""
    settings, lake = open_lake(settings)
    summary = run_job(ingest.IngestJob(lake, settings, source, retry_failed, kind), settings)
    return publish(kind, f"{kind} {source.uri} (run {summary.run_id})", summary)
