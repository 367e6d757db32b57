"""Crawl flows: a Flickr search or a URL list -> downloaded images in the lake + manifest rows.

Both land where `cbir ingest` does. The deployment that crawls a Flickr search on the cron of
crawl.schedule is in flows/serve.py (`cbir serve`, `cbir crawl flickr ... --serve`).
"""

from __future__ import annotations

from prefect import flow

from cbir.settings import Settings, load_settings
from flows.ingest import store_images
from jobs import flickr
from jobs.reader import Listing, read_web_entries, resolve_url_list


@flow(name="crawl-flickr", log_prints=True)
def crawl_flickr_flow(text: str | None = None, tags: str | None = None, tag_mode: str = "any",
                      license: str | None = None, min_taken: str | None = None, max_taken: str | None = None,
                      bbox: str | None = None, sort: str = "relevance", max_photos: int = 100,
                      retry_failed: bool = False, settings: Settings | None = None) -> dict:
    """Search Flickr (photos.search) and download the photos the manifest does not have yet."""
    settings = settings or load_settings()
    query = flickr.Search(text, tags, tag_mode, license, min_taken, max_taken, bbox, sort, max_photos)
    entries = list(flickr.search(settings.flickr, query, settings.crawl.retries))
    print(f"Flickr found {len(entries)} photos for {query.describe()}")
    return store_images("crawl", Listing(query.describe(), entries), settings, retry_failed)


@flow(name="crawl-urls", log_prints=True)
def crawl_urls_flow(url_list: str, retry_failed: bool = False, settings: Settings | None = None) -> dict:
    """Download every image of a URL list (CSV, JSONL, Parquet or text) that the manifest does not have yet."""
    settings = settings or load_settings()
    source = resolve_url_list(url_list, settings)
    return store_images("crawl", Listing(source.uri, read_web_entries(source)), settings, retry_failed)

