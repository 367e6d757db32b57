"""What the routers share: the searcher (a dependency: the application's own), and checks of what a
request names."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, UploadFile

from cbir.lake import IMAGE_ID
from web.library import Library, Refused


def searcher(request: Request) -> Library:
    """The application's searcher, looked up per request (tests swap its methods)."""
    return request.app.state.searcher


SEARCHER = Annotated[Library, Depends(searcher)]


def checked_id(image_id: str) -> str:
    if not IMAGE_ID.fullmatch(image_id):
        raise Refused(404, "unknown-image", "No indexed image has this id (ids are 64 hex digits).")
    return image_id


def read_upload(searcher: Library, upload: UploadFile) -> bytes:
    return upload.file.read(searcher.settings.web.max_upload_bytes + 1)


def shown_uri(uri: str | None) -> str | None:
    """A URI as clients see it: web addresses whole; the server's own paths (local files, buckets) by
    their file name only, so no answer tells where the server keeps things."""
    if not uri or uri.startswith(("http://", "https://")):
        return uri
    return uri.rstrip("/").rsplit("/", 1)[-1] or None


def shown_details(details: dict) -> dict:
    return {
        **details,
        "uri": shown_uri(details["uri"]),
        "source": shown_uri(details["source"]),
        "also_at": sorted({shown_uri(uri) for uri in details["also_at"]} - {None}),
    }
