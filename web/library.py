"""What cbir web serves: a searcher (search.searcher) over the lake's captions, opened again when a newer
index run is committed, the captioner that describes uploaded images, loaded once, and the stored
images, their thumbnails and details.

The searcher is opened at start-up over the committed captions of the captioner version in use, joined
with the manifest for each image's stored format: the searcher `cbir search` holds, and each Spark task
of `cbir query` over its share. It is loaded from the index cache (search/cache.py) when
one was saved for the same lake state, and saved there after a build. Requests
look at the commit records at most every `web.reload_s`; when they changed, a background thread
builds the new index and swaps it in whole, so a search never waits for a rebuild and never sees
half of one. Refusals (bad input, nothing found) are `Refused`: an HTTP status, a reason slug and
a sentence for people.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from cbir.errors import CbirError, UsageError
from cbir.images import ImageRejected, Limits, image_id, inspect_image
from cbir.lake import Lake
from cbir.settings import Settings
from cbir.text import words
from models import store
from search.captioning import ImageCaptioner, indexed
from search.examples import check_examples
from search.gallery import thumbnail, thumbnail_jpeg
from search.rules import QueryRefused
from search.searcher import Searcher, folded

log = logging.getLogger("cbir.web")

MEDIA_TYPES = {
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
}
# How each reason of cbir.images.inspect_image answers over HTTP.
UPLOAD_STATUS = {"too-large": 413, "too-many-pixels": 413, "not-an-image": 415, "unsupported-format": 415}
FLICKR_LICENSES = {
    "0": "All Rights Reserved",
    "1": "CC BY-NC-SA 2.0",
    "2": "CC BY-NC 2.0",
    "3": "CC BY-NC-ND 2.0",
    "4": "CC BY 2.0",
    "5": "CC BY-SA 2.0",
    "6": "CC BY-ND 2.0",
    "7": "No known copyright restrictions",
    "8": "United States Government Work",
    "9": "Public Domain Dedication (CC0)",
    "10": "Public Domain Mark",
}
THUMBNAILS = 4096  # kept in memory, about 6 KB each
DETAIL_COLUMNS = [
    "image_id",
    "uri",
    "width",
    "height",
    "bytes",
    "status",
    "title",
    "tags",
    "license",
    "owner",
    "source_id",
    "taken_at",
    "page_url",
    "source",
    "ingested_at",
]
MAX_RELOAD_WAIT_S = 600  # a failing rebuild is tried again after 2, 4, 8 ... x web.reload_s, at most this


class Refused(Exception):
    """A request that cannot be answered: HTTP status, reason slug, and a message for people."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


@dataclass(frozen=True)
class Marker:
    """What an index was built from: the captioner version and the tables' states (Table.state())."""

    version: str | None
    captions: str | None
    manifest: str | None


@dataclass
class Snapshot:
    marker: Marker
    searcher: Searcher  # its index of image_id, uri, caption, format
    loaded_at: datetime
    seconds: float
    sources: tuple[pa.Table, np.ndarray] | None = None  # manifest rows of the indexed images, by image_id

    def __len__(self) -> int:
        return len(self.searcher)

    def row(self, image_id: str) -> dict | None:
        index = self.searcher.index
        at, table = index.row_of.get(image_id), index.table
        return None if at is None else {name: table.column(name)[at].as_py() for name in table.column_names}


@dataclass
class Result:
    rank: int
    image_id: str
    score: float
    caption: str
    uri: str | None
    matched_kind: str | None = None  # which of the image's texts matched the query best
    matched_text: str | None = None
    example: str | None = None  # the positive example it resembles most
    folded: list[Result] = field(default_factory=list)  # its near-duplicates ranked below it (search.duplicates)


@dataclass
class Answer:
    words: list[str]
    results: list[Result]
    caption: str | None = None  # generated for an uploaded image
    took_ms: float = 0.0
    version: str | None = None
    captions: int = 0
    extra: dict = field(default_factory=dict)
    like: list[str] = field(default_factory=list)  # the example images used (image ids)
    unlike: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)  # examples that could not be used: which and why


class Library:
    """The index and the captioner behind cbir web; thread-safe, searches run side by side."""

    def __init__(self, settings: Settings, lake: Lake | None = None):
        self.settings = settings
        self.lake = lake or Lake.open(settings)
        self._build_lock = threading.Lock()
        self._reloading = threading.Lock()  # held while a background reload runs
        self._captioner_lock = threading.Lock()
        self._decode_lock = threading.Lock()  # one upload at a time through TensorFlow
        # Every decode (upload checks, the encoder's, thumbnails) runs on these few threads: memory
        # stays within web.decodes x web.max_upload_pixels x 4 bytes however many requests come at
        # once (few threads also means few malloc arenas keeping freed pixels).
        self._decoder = ThreadPoolExecutor(settings.web.decodes, thread_name_prefix="cbir-decode")
        self._captioner: ImageCaptioner | None = None
        self.captioner_state = "not loaded"
        self.snapshot = self._build(self.marker())
        self._checked = time.monotonic()
        self._failures = 0  # rebuilds failed in a row
        self.thumbnail = lru_cache(maxsize=THUMBNAILS)(self._thumbnail)

    # The index.
    def marker(self) -> Marker:
        try:
            version = store.resolve(self.lake, self.settings.captioner.version)
        except UsageError:  # no captioner yet: nothing is indexed
            version = None
        # The manifest counts too: it holds the source texts and the details the pages show.
        return Marker(
            version,
            self.lake.table("captions").state(),
            self.lake.table("manifest").state(),
        )

    def _build(self, marker: Marker) -> Snapshot:
        started = time.perf_counter()
        searcher = Searcher.open(self.lake, self.settings, marker.version, extra=("format",))
        sources = self._sources(searcher.index.table.column("image_id"))
        seconds = time.perf_counter() - started
        log.info("index of %d images (captioner %s) ready in %.1f s", len(searcher), marker.version, seconds)
        return Snapshot(marker, searcher, datetime.now(UTC), seconds, sources)

    def _sources(self, indexed: pa.ChunkedArray) -> tuple[pa.Table, np.ndarray]:
        """The manifest rows of the indexed images, sorted by image_id, with the ids as fixed-width bytes to
        bisect: a page or /api/images answers from memory, not by scanning the manifest each time."""
        wanted = ds.field("image_id").isin(indexed.combine_chunks())
        rows = self.lake.table("manifest").dataset().to_table(columns=DETAIL_COLUMNS, filter=wanted).sort_by("image_id")
        return rows, rows.column("image_id").to_numpy(zero_copy_only=False).astype("S64")

    def maybe_reload(self) -> None:
        """At most every web.reload_s: look at the commit records, in the background; rebuild if they changed."""
        every = self.settings.web.reload_s
        if self._failures:  # back off: a broken lake is not read every few seconds
            every = min(every * 2**self._failures, MAX_RELOAD_WAIT_S)
        if not every or time.monotonic() - self._checked < every or not self._reloading.acquire(blocking=False):
            return
        self._checked = time.monotonic()
        threading.Thread(target=self._reload_in_background, name="cbir-web-reload", daemon=True).start()

    def _reload_in_background(self) -> None:
        try:
            self.reload()
            self._failures = 0
        except Exception:
            self._failures += 1
            log.exception("reloading the index failed (%d in a row); the previous one keeps serving", self._failures)
        finally:
            self._checked = time.monotonic()
            self._reloading.release()

    def reload(self) -> bool:
        """Rebuild when a run was committed (or dropped) since the index was built; True when it was."""
        with self._build_lock:
            marker = self.marker()
            if marker == self.snapshot.marker:
                return False
            snapshot = self._build(marker)
            self.snapshot = snapshot  # one assignment: searches see the old index or the new one
            self.thumbnail.cache_clear()
        if self._captioner is not None and self._captioner.version != marker.version and marker.version is not None:
            self.warm_up(wait=True)
        return True

    # Searching.
    def search(
        self, text: str | None, k: int, like: list[str] = (), unlike: list[str] = (), fold: bool = True
    ) -> Answer:
        """A text query, with or without example images of the index (image ids): more like `like`, less like
        `unlike` (search.examples); an example the index does not know is left out, and said so. With `fold`
        (and duplicates.fold), near-duplicates fold under the first of them."""
        snapshot = self.snapshot
        like, unlike = list(dict.fromkeys(like)), list(dict.fromkeys(unlike))
        try:
            if like or unlike:
                check_examples(like, unlike, self.settings.query.max_examples, has_text=bool(text))
            query = snapshot.searcher.rules.words(text) if text or not like else []
        except QueryRefused as exc:
            hint = ": type a few words that describe a picture" if exc.reason == "empty-text" else ""
            reason = "empty-query" if exc.reason == "empty-text" else exc.reason
            raise Refused(400, reason, f"{str(exc).capitalize()}{hint}.") from None
        if not (like or unlike):
            return self._answer(snapshot, query, k, fold=fold)
        examples, left_out = snapshot.searcher.examples(like, unlike)
        if not text and not examples.positive:
            raise Refused(404, "not-found", "No positive example could be used: " + "; ".join(left_out) + ".")
        answer = self._answer(snapshot, query, k, examples=examples, fold=fold)
        answer.like, answer.unlike = [e.name for e in examples.positive], [e.name for e in examples.negative]
        answer.left_out = left_out
        return answer

    def search_image(self, data: bytes, k: int) -> Answer:
        snapshot = self.snapshot
        started = time.perf_counter()
        caption, features = self.describe(data, snapshot.marker.version)
        seconds = time.perf_counter() - started
        query = words(caption)
        if not query:
            raise Refused(
                404, "no-match", "The captioner found no words for this image, so there is nothing to search for."
            )
        answer = self._answer(snapshot, query, k, caption, features)
        answer.extra["caption_ms"] = round(seconds * 1000, 1)
        return answer

    def _answer(
        self,
        snapshot: Snapshot,
        query: list[str],
        k: int,
        caption: str | None = None,
        features=None,
        examples=None,
        fold: bool = True,
    ) -> Answer:
        searcher = snapshot.searcher
        if not searcher.index:
            raise Refused(
                404,
                "empty-index",
                "Nothing is indexed yet: run `cbir index`; this page picks up the new index by itself.",
            )
        if not examples and not searcher.index.knows_any(query):
            said = f"the caption \u201c{caption}\u201d" if caption is not None else "the query"
            raise Refused(404, "no-match", f"No indexed caption has any word of {said}.")
        started = time.perf_counter()
        plan = searcher.plan("query", query, k, features, examples)
        hits = searcher.search(plan)
        if fold and self.settings.duplicates.fold:
            hits = folded(searcher.index, hits, self.settings.duplicates.threshold)
        results = [Result(**{**hit, "folded": [Result(**copy) for copy in hit.get("folded", [])]}) for hit in hits]
        took = (time.perf_counter() - started) * 1000
        return Answer(plan.words, results, caption, round(took, 3), snapshot.marker.version, len(snapshot))

    # Uploaded images.
    def warm_up(self, wait: bool = False) -> None:
        """Load the captioner (and encoder) for the index's version now, so the first upload does not wait."""

        def load():
            try:
                self._load_captioner(self.snapshot.marker.version)
            except Refused as exc:
                log.warning("image search is unavailable: %s", exc.message)

        if wait:
            load()
        else:
            threading.Thread(target=load, name="cbir-web-captioner", daemon=True).start()

    def _load_captioner(self, version: str | None):
        if version is None:
            self.captioner_state = "unavailable: no captioner in the lake yet"
            raise Refused(503, "no-captioner", "Searching by image needs a captioner: train one with `cbir train`.")
        with self._captioner_lock:
            if self._captioner is not None and self._captioner.version == version:
                return self._captioner
            self.captioner_state = f"loading {version}"
            try:
                captioner = ImageCaptioner.from_settings(self.lake, version, self.settings)  # one upload at a time
                # Before loading anything big.
                store.check_encoder(store.card(self.lake, version), captioner.encoder.key)
                captioner.load()
            except UsageError as exc:
                log.warning("the captioner cannot be loaded: %s", exc)
                reason = self._unplaced(str(exc))
                self.captioner_state = f"unavailable: {reason}"
                raise Refused(503, "no-captioner", f"Searching by image is unavailable: {reason}") from None
            except Exception:  # a weights file Keras cannot read, a lake that fails: its message may name paths
                log.exception("the captioner cannot be loaded")
                reason = "the encoder or the captioner failed to load (the server's log says why)"
                self.captioner_state = f"unavailable: {reason}"
                raise Refused(503, "no-captioner", f"Searching by image is unavailable: {reason}.") from None
            self._captioner = captioner
            self.captioner_state = f"loaded {version}"
            return captioner

    def _unplaced(self, message: str) -> str:
        """A message as clients see it: where the lake, the state folder and a weights file are stays untold."""
        places = {f" {self.lake.uri}": "", str(self.settings.state_dir): "(the state folder)"}
        weights = self.settings.encoder.weights
        if weights not in ("imagenet", "random"):
            places.update({weights: "(a local file)", os.path.abspath(weights): "(a local file)"})
        for place in sorted(places, key=len, reverse=True):  # a path before any shorter one inside it
            message = message.replace(place, places[place])
        return message

    def check_upload(self, data: bytes) -> None:
        """The checks ingest makes (format, pixels before decoding, a full decode), with the upload size limit."""
        limit = self.settings.web.max_upload_bytes
        if len(data) > limit:
            raise Refused(413, "too-large", f"The file is larger than web.max_upload_bytes={limit} bytes.")
        limits = Limits(limit, self.settings.web.max_upload_pixels, frozenset(self.settings.ingest.formats))
        try:
            self.decode(inspect_image, data, limits)
        except ImageRejected as exc:
            message = (
                str(exc)
                .replace("ingest.max_bytes", "web.max_upload_bytes")
                .replace("ingest.max_pixels", "web.max_upload_pixels")
            )
            raise Refused(UPLOAD_STATUS.get(exc.reason, 400), exc.reason, f"Not a usable image ({message}).") from None

    def describe(self, data: bytes, version: str | None = None) -> tuple[str, list[float]]:
        """The caption and features of an uploaded image: the stored ones when the captioner in use indexed
        these bytes (as the query job and cbir search take them), else made as the index job would make
        them (the same encoder, preprocessing, rounding of the features and decoding)."""
        self.check_upload(data)
        captioner = self._load_captioner(version or self.snapshot.marker.version)
        upload_id = image_id(data)
        if self.snapshot.row(upload_id) is not None:  # the index knows it: read its stored caption, no other upload
            known = indexed(self.lake, captioner.encoder, captioner.version, [upload_id])
            if known:
                return known[upload_id]
        with self._decode_lock:
            _, caption, features, reason = self.decode(
                lambda: next(captioner.caption([{"image_id": "upload"}], lambda row: data))
            )
        if reason:
            raise Refused(400, "unreadable-image", f"The image cannot be read: {reason}")
        return caption, features.tolist()

    # Stored images.
    def known(self, image_id: str) -> dict:
        row = self.snapshot.row(image_id)
        if row is None:
            raise Refused(404, "unknown-image", "No indexed image has this id.")
        return row

    def image(self, image_id: str) -> tuple[bytes, str]:
        """The stored bytes of an indexed image and their media type."""
        row = self.known(image_id)
        if not row["format"]:
            raise Refused(404, "missing-image", "The image is not in the lake's image store.")
        try:  # image_path checks the id and the format (a manifest row's) before they make a path
            with self.lake.fs.open_input_stream(self.lake.image_path(image_id, row["format"])) as stream:
                data = stream.read()
        except (OSError, CbirError):
            raise Refused(404, "missing-image", "The image is not in the lake's image store.") from None
        return data, MEDIA_TYPES.get(row["format"], "application/octet-stream")

    def _thumbnail(self, image_id: str) -> bytes:
        data, _ = self.image(image_id)
        try:
            return self.decode(thumbnail_jpeg, data, (240, 240))
        except Exception:  # noqa: BLE001 - damaged after ingest: no thumbnail, the page goes on
            raise Refused(404, "missing-image", "The stored image cannot be decoded.") from None

    def preview(self, data: bytes) -> str:
        """A data: URI thumbnail of an upload that passed check_upload."""
        return self.decode(thumbnail, data)

    def decode(self, function, *args):
        """function(*args) on a decode thread."""
        return self._decoder.submit(function, *args).result()

    def details(self, image_id: str) -> dict:
        """Everything known of an indexed image: its caption and its sources from the manifest."""
        row = self.known(image_id)
        rows, keys = self.snapshot.sources
        start, end = np.searchsorted(keys, image_id.encode(), "left"), np.searchsorted(keys, image_id.encode(), "right")
        found = rows.slice(start, end - start).to_pylist()
        found.sort(key=lambda r: (r["status"] != "ok", r["ingested_at"] or datetime.min.replace(tzinfo=UTC)))
        first = found[0] if found else {}
        license_id = first.get("license")
        flickr = (first.get("source_id") or "").startswith("flickr:")
        page_url = first.get("page_url")
        if not (isinstance(page_url, str) and page_url.startswith(("https://", "http://"))):
            page_url = None  # a link to show people: no javascript: or data: URLs
        return {
            "image_id": image_id,
            "caption": row["caption"],
            "uri": row["uri"],
            "format": row["format"],
            "width": first.get("width"),
            "height": first.get("height"),
            "bytes": first.get("bytes"),
            "title": first.get("title"),
            "tags": list(first.get("tags") or []),
            "license": license_id,
            "license_name": FLICKR_LICENSES.get(license_id) if flickr else None,
            "owner": first.get("owner"),
            "source_id": first.get("source_id"),
            "taken_at": first.get("taken_at"),
            "page_url": page_url,
            "source": first.get("source"),
            "ingested_at": first["ingested_at"].isoformat() if first.get("ingested_at") else None,
            "also_at": sorted({r["uri"] for r in found[1:] if r["uri"] and r["uri"] != first.get("uri")}),
            "model_version": self.snapshot.marker.version,
        }

    def status(self) -> dict:
        snapshot = self.snapshot
        return {
            "captions": len(snapshot),
            "model_version": snapshot.marker.version,
            "captions_version": snapshot.marker.captions and int(snapshot.marker.captions.rsplit("@", 1)[1]),
            "loaded_at": snapshot.loaded_at.isoformat(),
            "load_seconds": round(snapshot.seconds, 3),
            "captioner": self.captioner_state,
        }
