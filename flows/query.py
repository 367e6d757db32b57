"""Query flow: a batch query file -> results, errors and a gallery in the lake.

The job's steps (read the query file; caption and search; commit) and the gallery are Prefect tasks, so
the run's timeline shows where time went and what failed. Only the commit retries: a commit is idempotent.
"""

from __future__ import annotations

from typing import Annotated

from prefect.artifacts import create_link_artifact, create_table_artifact
from prefect.utilities.annotations import quote
from pydantic import Field

from cbir.errors import UsageError
from cbir.lake import Lake
from cbir.settings import MAX_K, Settings
from flows.common import flow, open_lake, run_job, stage
from flows.reporting import publish
from jobs import query
from models import store
from search import gallery
from search.index import likeness_vectors

TOP_PER_QUERY = 3  # results per query in the Prefect table artifact
ARTIFACT_ROWS = 300


@flow(name="query", log_prints=True)
def query_flow(
    query_file: str,
    k: Annotated[int, Field(ge=1, le=MAX_K)] | None = None,
    captions: str | None = None,
    settings: Settings | None = None,
) -> dict:
    """Answer every query of a query file with its exact BLEU top k; write results, errors and a gallery.

    Args:
        query_file: CSV, JSONL or Parquet with query_id and text or image (and optional k): a path on the machine
            that runs the flow, or an s3:// URI
        k: results per query for the rows without a k of their own (default: the query.k setting)
        captions: search this Parquet dataset (image_id, caption[, uri]) instead of the lake's captions
    """
    settings, lake = open_lake(settings)
    if k is not None:
        settings = settings.model_copy(update={"query": settings.query.model_copy(update={"k": k})})
    summary = run_job(query.QueryJob(lake, settings, query_file, captions), settings)
    results = lake.query_tables(summary.run_id)[0].read().to_pylist()
    gallery_uri = stage(write_gallery, name="gallery")(quote(lake), quote(settings), quote(summary), quote(results))

    publish("query", f"query {query_file} (run {summary.run_id})", summary)
    top = [
        {k: row[k] for k in ("query_id", "rank", "score", "caption", "image_id")}
        for row in sorted(results, key=lambda r: (r["query_id"], r["rank"]))
        if row["rank"] <= TOP_PER_QUERY
    ]
    if top:
        create_table_artifact(
            table=top[:ARTIFACT_ROWS],
            key="query-results",
            description=f"Top {TOP_PER_QUERY} results per query of run {summary.run_id}",
        )
    link = gallery_uri if gallery_uri.startswith("s3://") else f"file://{gallery_uri}"
    create_link_artifact(
        link=link, link_text="gallery", key="query-gallery", description=f"Gallery of query run {summary.run_id}"
    )
    print(f"gallery: {gallery_uri}")
    return {**summary.as_dict(), "gallery": gallery_uri}


def _version(lake: Lake, settings: Settings) -> str | None:
    """The captioner in use (its images' likeness vectors fold the gallery's near-duplicates); None: none yet."""
    try:
        return store.resolve(lake, settings.captioner.version)
    except UsageError:
        return None


def write_gallery(lake: Lake, settings: Settings, summary: query.QuerySummary, results: list[dict]) -> str:
    """The run's gallery page, written beside its results; returns its URI."""
    page = gallery.render(
        lake,
        settings,
        f"cbir query run {summary.run_id}",
        results,
        summary.answered_queries,
        summary.error_rows,
        settings.query.gallery_queries,
        likeness_vectors(lake, _version(lake, settings), {r["image_id"] for r in results}),
    )
    return gallery.write(lake, summary.run_id, page)
