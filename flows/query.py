"""Query flow: a batch query file -> results, errors and a gallery in the lake.

Each stage of the job (read the query file, caption image queries, search, commit the results,
commit the errors) and the gallery is a Prefect task, so the run's timeline shows where time went
and what failed. Only the commits retry: jobs.query.commit does nothing once a run is committed.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_link_artifact, create_table_artifact
from prefect.cache_policies import NONE
from prefect.utilities.annotations import quote

from cbir.lake import Lake
from cbir.settings import Settings, load_settings
from flows.reporting import Progress, publish_summary
from jobs import gallery, query
from jobs.spark import spark_session

TOP_PER_QUERY = 3  # results per query in the Prefect table artifact
ARTIFACT_ROWS = 300
RETRIES = {"commit the results": 2, "commit the errors": 2}


def as_task(name: str, function, *args):
    """Run a stage as a Prefect task. Its arguments (a Spark session, a lake) are passed as they are:
    never hashed, copied or stored (quote), and its result is kept in memory only."""
    stage = task(function, name=name, retries=RETRIES.get(name, 0), retry_delay_seconds=5, cache_policy=NONE,
                 persist_result=False)
    return stage(*(quote(arg) for arg in args))


@flow(name="query", log_prints=True)
def query_flow(query_file: str, captions: str | None = None, settings: Settings | None = None) -> dict:
    """Answer every query of QUERY_FILE with its exact BLEU top k; write results, errors and a gallery."""
    settings = settings or load_settings()
    lake = Lake.open(settings)
    lake.check()
    progress = Progress("query-progress", f"query {query_file}")
    with spark_session(settings) as spark:
        summary = query.run(spark, lake, settings, query_file, captions_table=captions, progress=progress,
                            stage=as_task)
    progress.finish()
    results = lake.query_tables(summary.run_id)[0].read().to_pylist()
    gallery_uri = as_task("gallery", write_gallery, lake, settings, summary, results)

    publish_summary("query-summary", f"query {query_file} (run {summary.run_id})", summary.rows())
    top = [{k: row[k] for k in ("query_id", "rank", "score", "caption", "image_id")}
           for row in sorted(results, key=lambda r: (r["query_id"], r["rank"])) if row["rank"] <= TOP_PER_QUERY]
    if top:
        create_table_artifact(table=top[:ARTIFACT_ROWS], key="query-results",
                              description=f"Top {TOP_PER_QUERY} results per query of run {summary.run_id}")
    link = gallery_uri if gallery_uri.startswith("s3://") else f"file://{gallery_uri}"
    create_link_artifact(link=link, link_text="gallery", key="query-gallery",
                         description=f"Gallery of query run {summary.run_id}")
    print(f"gallery: {gallery_uri}")
    return {**summary.as_dict(), "gallery": gallery_uri}


def write_gallery(lake: Lake, settings: Settings, summary: query.QuerySummary, results: list[dict]) -> str:
    """The run's gallery page, written beside its results; returns its URI."""
    page = gallery.render(lake, settings, f"cbir query run {summary.run_id}", results, summary.answered_queries,
                          summary.error_rows, settings.query.gallery_queries)
    return gallery.write(lake, summary.run_id, page)
