"""Query flows: a batch query file (results, errors and a gallery in the lake) and one interactive search."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_link_artifact, create_table_artifact

from cbir.lake import Lake
from cbir.settings import Settings, load_settings
from flows.reporting import Progress, publish_summary, render_table
from jobs import gallery, query
from jobs.spark import spark_session

TOP_PER_QUERY = 3  # results per query in the Prefect table artifact
ARTIFACT_ROWS = 300


@flow(name="query", log_prints=True)
def query_flow(query_file: str, captions: str | None = None, settings: Settings | None = None) -> dict:
    """Answer every query of QUERY_FILE with its exact BLEU top k; write results, errors and a gallery."""
    settings = settings or load_settings()
    lake = Lake.open(settings)
    lake.check()
    progress = Progress("query-progress", f"query {query_file}")
    with spark_session(settings) as spark:
        summary = query.run(spark, lake, settings, query_file, captions_table=captions, progress=progress)
    progress.finish()
    results = lake.query_tables(summary.run_id)[0].read().to_pylist()
    page = gallery.render(lake, settings, f"cbir query run {summary.run_id}", results, summary.answered_queries,
                          summary.error_rows, settings.query.gallery_queries)
    gallery_uri = gallery.write(lake, summary.run_id, page)

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


@flow(name="search", log_prints=True)
def search_flow(text: str | None = None, image: str | None = None, k: int | None = None,
                settings: Settings | None = None) -> list[dict]:
    """One query, by text or by example image, printed as a table."""
    settings = settings or load_settings()
    lake = Lake.open(settings)
    lake.check()
    one = query.Query("search", k or settings.query.k, text=text, image=image)
    with spark_session(settings) as spark:
        asked, hits = query.search_one(spark, lake, settings, one)
    if asked.caption is not None:
        print(f"caption of the query image: {asked.caption}")
    rows = [{"rank": h["rank"], "score": round(h["score"], 4), "matched": f"{h['matched_kind']}: {h['matched_text']}",
             "caption": h["caption"], "uri": h["uri"]} for h in hits]
    print(render_table(f"top {len(rows)} for \u201c{asked.text or asked.caption}\u201d", rows) if rows else "no results")
    return hits
