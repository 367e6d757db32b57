"""Deployments: what `cbir serve` serves to a Prefect server.

- `crawl-flickr/scheduled-crawl`: a Flickr search on the cron of crawl.schedule;
- `index/scheduled-index`: caption what is new, on the cron of index.schedule;
- `query/on-demand`: a batch query file, run from the Prefect UI's form (or the API);
- `lake-maintenance/scheduled-maintenance`: weekly, compact the Delta tables' small files, then vacuum.

The flows here are the pipeline's own (same names, so their runs sit beside the command's), with
typed parameters for a person to fill in and no `settings` parameter: every run loads its
settings from the environment of the process that serves it, so no setting, and no secret, is
ever a deployment parameter.
"""

from __future__ import annotations

import datetime
from typing import Annotated, Literal

from prefect import flow
from pydantic import Field

from cbir.settings import Settings, load_settings
from flows.crawl import crawl_flickr_flow
from flows.index import index_flow
from flows.maintenance import scheduled_maintenance
from flows.query import query_flow
from jobs.flickr import SORTS, Search

Sort = Literal[SORTS]  # Flickr's orders, a menu in the UI's form


@flow(name="crawl-flickr", log_prints=True)
def crawl_flickr(text: str | None = None, tags: str | None = None, tag_mode: Literal["any", "all"] = "any",
                 license: str | None = None, min_taken: datetime.date | None = None,
                 max_taken: datetime.date | None = None, bbox: str | None = None, sort: Sort = "relevance",
                 max_photos: Annotated[int, Field(ge=1, le=100_000)] = 100, retry_failed: bool = False) -> dict:
    """Search Flickr (photos.search) and download the photos the manifest does not have yet.

    Args:
        text: free text, matched against titles, descriptions and tags
        tags: comma-separated tags
        tag_mode: any (default) or all of the tags
        license: comma-separated Flickr license ids, e.g. 4,5,9,10
        min_taken: taken on or after this day
        max_taken: taken on or before this day
        bbox: min_lon,min_lat,max_lon,max_lat
        sort: Flickr's order
        max_photos: at most this many photos
        retry_failed: download again what failed before
    """
    return crawl_flickr_flow.fn(text, tags, tag_mode, license, min_taken and min_taken.isoformat(),
                                max_taken and max_taken.isoformat(), bbox, sort, max_photos, retry_failed)


@flow(name="index", log_prints=True)
def index() -> dict:
    """Embed and caption the manifest's ok images that the captioner in use has not captioned yet."""
    return index_flow.fn()


@flow(name="query", log_prints=True)
def query(query_file: str, k: Annotated[int, Field(ge=1, le=1000)] | None = None,
          captions: str | None = None) -> dict:
    """Answer every query of a query file with its exact BLEU top k; write results, errors and a gallery.

    Args:
        query_file: CSV, JSONL or Parquet with query_id and text or image (and optional k): a path on the machine
            that serves this deployment, or an s3:// URI
        k: results per query for the rows without a k of their own (default: the query.k setting)
        captions: search this Parquet dataset (image_id, caption[, uri]) instead of the lake's captions
    """
    settings = load_settings()
    if k is not None:
        settings = settings.model_copy(update={"query": settings.query.model_copy(update={"k": k})})
    return query_flow.fn(query_file, captions, settings)


def deployments(settings: Settings, search: Search | None) -> list:
    """The deployments; the crawl is paused until it has a search (a run from the UI can give one)."""
    return [scheduled_crawl(settings, search), scheduled_index(settings), on_demand_query(),
            scheduled_maintenance(settings)]


def scheduled_crawl(settings: Settings, search: Search | None):
    """The Flickr search as a deployment on crawl.schedule."""
    if search is not None:
        search.check()
    parameters = {k: v for k, v in vars(search).items() if v is not None} if search else {}
    description = f"crawl {search.describe()}" if search else \
        "paused: no search yet (cbir serve --text/--tags/--bbox, or a custom run with one)"
    return crawl_flickr.to_deployment(name="scheduled-crawl", cron=settings.crawl.schedule, paused=search is None,
                                      parameters=parameters, description=description, tags=["cbir"])


def scheduled_index(settings: Settings):
    return index.to_deployment(name="scheduled-index", cron=settings.index.schedule, tags=["cbir"],
                               description="caption the images that are new since the last index run")


def on_demand_query():
    return query.to_deployment(name="on-demand", tags=["cbir"],
                               description="answer a batch query file: results table, gallery and artifacts")
