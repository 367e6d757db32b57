"""Index flow: caption every new image of the manifest with the current captioner (or drop a version)."""

from __future__ import annotations

from functools import partial

from cbir.settings import Settings
from flows.common import flow, open_lake, stage, stage_and_commit
from flows.reporting import publish
from jobs import index

find_pending = stage(index.plan, name="find pending images")
caption = stage(index.caption, name="caption and write")


@flow(name="index", log_prints=True)
def index_flow(drop_version: str | None = None, settings: Settings | None = None) -> dict:
    """Embed and caption the manifest's ok images that the captioner version has not captioned yet."""
    settings, lake = open_lake(settings)
    if drop_version:
        runs, rows = index.drop_version(lake, drop_version)
        print(f"dropped {rows} captions of captioner {drop_version} ({runs} runs); features are kept")
        return {"dropped_version": drop_version, "runs": runs, "rows": rows}
    summary, todo, captions = find_pending(lake, settings)
    write = partial(caption, lake=lake, settings=settings, summary=summary, todo=todo, captions=captions)
    staged = stage_and_commit(settings, "index", "index", write if todo.num_rows else None)
    summary = index.tally(summary, staged)
    return publish("index", f"index with captioner {summary.version} (run {summary.run_id})", summary)
