"""The URIs cbir reads and writes: s3://bucket/key, file:///path or a local path; parsed here only."""

from __future__ import annotations

import re

SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
S3 = "s3://"


def scheme(uri: str) -> str | None:
    """The scheme of a scheme://... address; None for a path."""
    match = SCHEME.match(uri)
    return match.group(1) if match else None


def is_s3(uri: str) -> bool:
    return uri.startswith(S3)


def link(uri: str) -> str:
    """Where a browser opens it: an s3:// URI as it is, a local path as file://."""
    return uri if is_s3(uri) else f"file://{uri}"
