"""Flickr search: photos.search through the flickrapi client, page by page, into crawl entries.

Runs on the driver (a few hundred photos a call); the downloads then run in Spark tasks.
One call per page asks for everything the manifest keeps (title, tags, owner, license, date
taken and the size URLs). Calls are paced under flickr.calls_per_hour (jobs.crawl.pacing). The key and secret only
travel in the OAuth-signed request; they are never logged or returned.
"""

from __future__ import annotations

import datetime
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import flickrapi
import requests
from flickrapi.exceptions import FlickrError

from cbir.errors import CbirError, UsageError
from cbir.reader import Entry
from cbir.settings import Flickr
from jobs.crawl.pacing import Pacer

logging.getLogger("flickrapi").setLevel(logging.WARNING)  # its INFO and DEBUG lines echo every call
KEY_ERRORS = {"96", "97", "98", "100"}  # signature, missing or invalid key
RETRY_ERRORS = {"105", "106"}  # service unavailable, write operation failed
MAX_PHOTOS = 100_000  # per search, a deployment's form says so too
SORTS = (
    "relevance",
    "date-posted-desc",
    "date-posted-asc",
    "date-taken-desc",
    "date-taken-asc",
    "interestingness-desc",
    "interestingness-asc",
)


class FlickrUnavailable(CbirError):
    """Flickr did not answer after the retries: the crawl stops; its rerun resumes."""


@dataclass(frozen=True)
class Search:
    """photos.search arguments as cbir crawl flickr takes them."""

    text: str | None = None
    tags: str | None = None  # comma separated
    tag_mode: str = "any"
    license: str | None = None  # comma separated ids
    min_taken: str | None = None  # YYYY-MM-DD
    max_taken: str | None = None
    bbox: str | None = None  # min_lon,min_lat,max_lon,max_lat
    sort: str = "relevance"
    max_photos: int = 100

    def check(self) -> None:
        if not (self.text or self.tags or self.bbox):
            raise UsageError("crawl flickr needs --text, --tags or --bbox (Flickr refuses searches without one)")
        if self.tag_mode not in ("any", "all"):
            raise UsageError(f"--tag-mode must be any or all, got {self.tag_mode!r}")
        if self.sort not in SORTS:
            raise UsageError(f"--sort must be one of {', '.join(SORTS)}; got {self.sort!r}")
        if not 1 <= self.max_photos <= MAX_PHOTOS:
            raise UsageError(f"--max must be 1 to {MAX_PHOTOS:,}, got {self.max_photos}")
        for flag, day in (("--min-taken", self.min_taken), ("--max-taken", self.max_taken)):
            try:
                day is None or datetime.date.fromisoformat(str(day))
            except ValueError:
                raise UsageError(f"{flag} must be a day, YYYY-MM-DD; got {day!r}") from None

    def arguments(self, sizes: list[str]) -> dict:
        extras = ["description", "license", "date_taken", "owner_name", "tags", *(f"url_{size}" for size in sizes)]
        return {
            k: v
            for k, v in {
                "text": self.text,
                "tags": self.tags,
                "tag_mode": self.tag_mode,
                "license": self.license,
                "min_taken_date": self.min_taken,
                "max_taken_date": self.max_taken,
                "bbox": self.bbox,
                "sort": self.sort,
                "media": "photos",
                "extras": ",".join(extras),
            }.items()
            if v
        }

    def describe(self) -> str:
        shown = {k: v for k, v in asdict(self).items() if v and k != "max_photos"}
        return "flickr " + " ".join(f"{k}={v}" for k, v in shown.items())


def client(config: Flickr) -> flickrapi.FlickrAPI:
    if config.api_key is None or config.api_secret is None:
        raise UsageError(
            "crawl flickr needs flickr.api_key and flickr.api_secret "
            "(set CBIR_FLICKR__API_KEY and CBIR_FLICKR__API_SECRET)"
        )
    api = flickrapi.FlickrAPI(
        config.api_key.get_secret_value(),
        config.api_secret.get_secret_value(),
        format="parsed-json",
        store_token=False,
        cache=False,
        timeout=config.timeout_s,
    )
    api.REST_URL = config.rest_url  # per instance: tests and proxies point it elsewhere
    return api


def search(config: Flickr, query: Search, retries: int = 3, call: Callable[..., dict] | None = None) -> Iterator[Entry]:
    """Up to query.max_photos entries, page by page, in Flickr's order; `call` (default: call_page) fetches a page."""
    query.check()
    api, pace, call = client(config), Pacer(config.calls_per_hour / 3600), call or call_page
    arguments, found, page = query.arguments(config.sizes), 0, 1
    per_page = min(config.per_page, query.max_photos)
    while found < query.max_photos:
        result = call(api, config, pace, retries, page=page, per_page=per_page, **arguments)["photos"]
        photos = result.get("photo", [])
        for photo in photos[: query.max_photos - found]:
            yield entry(photo, config.sizes)
        found += min(len(photos), query.max_photos - found)
        if not photos or page >= int(result.get("pages", 0)):
            return
        page += 1


def _content(value) -> str | None:
    """Flickr's JSON gives a description as {"_content": text}."""
    text = value.get("_content") if isinstance(value, dict) else value
    return text.strip() or None if isinstance(text, str) else None


def entry(photo: dict, sizes: list[str]) -> Entry:
    """One search result -> an entry with the first configured size it has, or an error."""
    owner = photo.get("owner", "")
    page_url = f"https://www.flickr.com/photos/{owner}/{photo['id']}"
    url = next((photo[f"url_{size}"] for size in sizes if photo.get(f"url_{size}")), None)
    meta = dict(
        title=photo.get("title") or None,
        tags=photo.get("tags", "").split() or None,
        description=_content(photo.get("description")),
        source_id=f"flickr:{photo['id']}",
        owner=photo.get("ownername") or owner or None,
        license=str(photo["license"]) if photo.get("license") is not None else None,
        taken_at=photo.get("datetaken") or None,
        page_url=page_url,
    )
    if url is None:
        return Entry.failed(page_url, "no-size", f"none of flickr.sizes={','.join(sizes)} is offered", **meta)
    return Entry(url, **meta)


def call_page(api: flickrapi.FlickrAPI, config: Flickr, pace: Pacer, retries: int, **arguments) -> dict:
    """One photos.search call: waits out rate limits, retries outages, turns refusals into one clear line."""
    waits = failures = 0
    while True:
        pace.wait()
        try:
            return api.photos.search(**arguments)
        except FlickrError as exc:
            code, message = str(exc.code) if exc.code is not None else None, str(exc)
            if "Status code 429" in message and waits < config.rate_limit_waits:
                waits += 1
                print(
                    f"Flickr says too many calls: waiting {config.rate_limit_wait_s:.0f} s, then resuming "
                    f"(page {arguments['page']})"
                )
                time.sleep(config.rate_limit_wait_s)
                continue
            if code in KEY_ERRORS:
                raise UsageError(
                    f"Flickr refused the API key (flickr.api_key, flickr.api_secret): {_message(exc)}"
                ) from None
            if code is not None and code not in RETRY_ERRORS:
                raise UsageError(f"Flickr refused the search: {_message(exc)}") from None
            problem = _message(exc)
        except requests.RequestException as exc:
            problem = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        failures += 1
        if failures > retries:
            raise FlickrUnavailable(
                f"Flickr did not answer page {arguments['page']} after {retries} retries: {problem}"
            )
        time.sleep(random.uniform(0, 2**failures))


def _message(exc: FlickrError) -> str:
    return str(exc).removeprefix("Error: ").removeprefix("do_request: ")
