"""Where the lake's bytes live: a filesystem for a URI (a local folder or S3), the same endpoint and keys for
delta-rs, files written once and atomically, fsync."""

from __future__ import annotations

import os
import uuid

import pyarrow.fs as pafs

from cbir import uris
from cbir.settings import S3


def open_filesystem(uri: str, s3: S3) -> tuple[pafs.FileSystem, str]:
    """A URI (local path, file:// or s3://) -> (filesystem, path within it)."""
    if uris.is_s3(uri):
        return pafs.S3FileSystem(**_s3_options(s3)), uri.removeprefix(uris.S3).rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))


def _s3_options(s3: S3) -> dict:
    # Delayed open lets a small write be one PutObject instead of a three-request multipart upload.
    options: dict = {"allow_delayed_open": True}
    if s3.endpoint_url:
        scheme, _, host = s3.endpoint_url.rstrip("/").partition("://")
        options.update(endpoint_override=host, scheme=scheme)
    if s3.region:
        options["region"] = s3.region
    if s3.access_key and s3.secret_key:
        options.update(access_key=s3.access_key.get_secret_value(), secret_key=s3.secret_key.get_secret_value())
    return options


def delta_storage_options(s3: S3) -> dict[str, str]:
    """The same endpoint and credentials for delta-rs (object_store). Commits use S3 conditional writes
    (If-None-Match), which delta-rs 1.x does by default: no locking provider, never AWS_S3_ALLOW_UNSAFE_RENAME."""
    options: dict[str, str] = {}
    if s3.endpoint_url:
        options["AWS_ENDPOINT_URL"] = s3.endpoint_url.rstrip("/")
        if s3.endpoint_url.startswith("http://"):
            options["AWS_ALLOW_HTTP"] = "true"
    region = s3.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["AWS_REGION"] = region
    if s3.access_key and s3.secret_key:
        options.update(
            AWS_ACCESS_KEY_ID=s3.access_key.get_secret_value(), AWS_SECRET_ACCESS_KEY=s3.secret_key.get_secret_value()
        )
    return options


def fsync_dir(path: str) -> None:
    """Make a rename or a new file in this folder durable (the folder's entry, not just the data)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_file(path: str) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def put_bytes(fs: pafs.FileSystem, path: str, data: bytes, overwrite: bool = False) -> bool:
    """Write atomically; without overwrite, False when the path exists (content-addressed reuse)."""
    if not overwrite and fs.get_file_info(path).type != pafs.FileType.NotFound:
        return False
    if is_local(fs):  # a reader must never see a half-written file, nor an empty one after a power cut
        parent = path.rsplit("/", 1)[0]
        fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        fsync_dir(parent)
    else:  # an object PUT is atomic already, and S3 has no folders to create
        with fs.open_output_stream(path) as out:
            out.write(data)
    return True
