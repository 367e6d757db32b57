"""Crawl flows: a Flickr search or a URL list -> downloaded images in the lake + manifest rows.

Both land where `cbir ingest` does. flows/serve.py deploys crawl-flickr on the cron of
crawl.schedule (`cbir serve`, `cbir crawl flickr ... --serve`): its typed parameters are the
deployment's form, and a served run loads its settings where it runs.
"""

from __future__ import annotations

import datetime
from typing import Annotated, Literal

from pydantic import Field

from cbir.reader import Listing, read_web_entries, resolve_url_list
from cbir.settings import Settings, load_settings
from flows.common import flow, stage
from flows.ingest import store_images
from jobs.crawl import flickr

Sort = Literal[flickr.SORTS]  # Flickr's orders, a menu in the UI's form


def _unavailable(task, task_run, state) -> bool:
    """Retry a page only when Flickr did not answer; a refusal (bad key, bad search) stays one."""
    return isinstance(state.result(raise_on_failure=False), flickr.FlickrUnavailable)


# Reading a page changes nothing: after the client's own quick retries, the page is asked again later.
flickr_page = stage(
    flickr.call_page, name="flickr page", retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=_unavailable
)


@flow(name="crawl-flickr", log_prints=True)
def crawl_flickr_flow(
    text: str | None = None,
    tags: str | None = None,
    tag_mode: Literal["any", "all"] = "any",
    license: str | None = None,
    min_taken: datetime.date | None = None,
    max_taken: datetime.date | None = None,
    bbox: str | None = None,
    sort: Sort = "relevance",
    max_photos: Annotated[int, Field(ge=1, le=flickr.MAX_PHOTOS)] = 100,
    retry_failed: bool = False,
    settings: Settings | None = None,
) -> dict:
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
        settings: none in a deployment: a served run loads them where it runs
    """
    settings = settings or load_settings()
    query = flickr.Search(
        text,
        tags,
        tag_mode,
        license,
        min_taken and min_taken.isoformat(),
        max_taken and max_taken.isoformat(),
        bbox,
        sort,
        max_photos,
    )
    entries = list(flickr.search(settings.flickr, query, settings.crawl.retries, call=flickr_page))
    print(f"Flickr found {len(entries)} photos for {query.describe()}")
    return store_images("crawl", Listing(query.describe(), entries), settings, retry_failed)


@flow(name="crawl-urls", log_prints=True)
def crawl_urls_flow(url_list: str, retry_failed: bool = False, settings: Settings | None = None) -> dict:
    """Download every image of a URL list (CSV, JSONL, Parquet or text) that the manifest does not have yet."""
    settings = settings or load_settings()
    source = resolve_url_list(url_list, settings)
    return store_images("crawl", Listing(source.uri, read_web_entries(source)), settings, retry_failed)
