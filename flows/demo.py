"""Demo flow: the pipeline on the embedded default and the sample photos that pip installed."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow

from cbir.samples import skimage_photos
from cbir.settings import Settings, load_settings
from flows.ingest import ingest_flow


@flow(name="demo", log_prints=True)
def demo_flow(settings: Settings | None = None) -> dict:
    """Ingest the scikit-image sample photos (with their docstrings as captions) into the lake."""
    settings = settings or load_settings()
    manifest = Path(settings.state_dir) / "samples" / "skimage.jsonl"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text("".join(json.dumps(row) + "\n" for row in skimage_photos()))
    summary = ingest_flow(str(manifest), settings=settings)
    print(f"lake: {settings.lake}")
    return summary
