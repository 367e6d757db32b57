"""Index flow: caption every new image of the manifest with the current captioner (or drop a version)."""

from __future__ import annotations

from cbir.settings import Settings
from flows.common import flow, open_lake, run_job
from flows.reporting import publish
from jobs import index


@flow(name="index", log_prints=True)
def index_flow(drop_version: str | None = None, settings: Settings | None = None) -> dict:
    """Embed and caption the manifest's ok images that the captioner version has not captioned yet."""
    settings, lake = open_lake(settings)
    if drop_version:
        runs, rows = index.drop_version(lake, drop_version)
        print(f"dropped {rows} captions of captioner {drop_version} ({runs} runs); features are kept")
        return {"dropped_version": drop_version, "runs": runs, "rows": rows}
    summary = run_job(index.IndexJob(lake, settings), settings)
    return publish("index", f"index with captioner {summary.version} (run {summary.run_id})", summary)
