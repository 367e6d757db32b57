"""Index flow: caption every new image of the manifest with the current captioner (or drop a version)."""

from __future__ import annotations

from prefect import flow

from cbir.lake import Lake
from cbir.settings import Settings, load_settings
from flows.reporting import Progress, publish_summary
from jobs import index
from jobs.spark import spark_session


@flow(name="index", log_prints=True)
def index_flow(drop_version: str | None = None, settings: Settings | None = None) -> dict:
    """Embed and caption the manifest's ok images that the captioner version has not captioned yet."""
    settings = settings or load_settings()
    lake = Lake.open(settings)
    lake.check()
    if drop_version:
        runs, rows = index.drop_version(lake, drop_version)
        print(f"dropped {rows} captions of captioner {drop_version} ({runs} runs); features are kept")
        return {"dropped_version": drop_version, "runs": runs, "rows": rows}
    progress = Progress("index-progress", "index")
    with spark_session(settings) as spark:
        summary = index.run(spark, lake, settings, progress=progress)
    progress.finish()
    publish_summary("index-summary", f"index with captioner {summary.version} (run {summary.run_id})", summary.rows())
    return summary.as_dict()
