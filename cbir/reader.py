"""Reader: a SOURCE (a folder, an s3:// prefix, one image, or a manifest file) -> entries to ingest.

A manifest is CSV, JSONL (or a JSON array) or Parquet with a `uri` column and optional `caption`,
`title`, `description` and `tags`, or a .txt file with one uri per line; .gz, .bz2 and .zst copies work too.
Relative uris are resolved against the manifest's folder. A bad row becomes an entry that
carries its error, so it is recorded as a failed manifest row and the rest goes on.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cbir import uris
from cbir.errors import UsageError
from cbir.images import ImageRejected
from cbir.settings import S3, Settings
from cbir.storage import open_filesystem

MANIFEST_FORMATS = {
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".txt": "txt",
}
COMPRESSIONS = (".gz", ".bz2", ".zst")
CHUNK = 2**16  # bytes decompressed at a time when a file's size is capped


class Entry(NamedTuple):
    uri: str
    caption: str | None = None
    title: str | None = None
    tags: list[str] | None = None
    error: str | None = None
    source_id: str | None = None  # the photo's id at its source, e.g. flickr:53210987654
    owner: str | None = None
    license: str | None = None
    taken_at: str | None = None
    page_url: str | None = None
    description: str | None = None
    reason: str | None = None  # the error's reason alone

    @classmethod
    def failed(cls, uri: str, reason: str, detail: str, **meta) -> Entry:
        return cls(uri, error=f"{reason}: {detail}", reason=reason, **meta)


ENTRY_DDL = (
    "uri string, caption string, title string, tags array<string>, error string, source_id string, "
    "owner string, license string, taken_at string, page_url string, description string, reason string"
)


@dataclass(frozen=True)
class Listing:
    """Entries that do not come from a SOURCE file or folder: a web crawl's finds."""

    uri: str
    entries: Iterable[Entry]


@dataclass(frozen=True)
class Source:
    uri: str
    fs: pafs.FileSystem
    path: str
    kind: str  # folder | image | csv | jsonl | parquet | txt

    def uri_of(self, path: str) -> str:
        return path if isinstance(self.fs, pafs.LocalFileSystem) else f"s3://{path}"


def resolve_source(uri: str, settings: Settings, columns: tuple[str, ...] = ("uri",), what: str = "source") -> Source:
    """Check that SOURCE exists and say what it is; a UsageError names what is wrong.

    A CSV or Parquet manifest must have the named columns (JSON lines are checked row by row).
    """
    scheme = uris.scheme(uri)
    if scheme in ("http", "https"):
        raise UsageError(f"{what} {uri}: web addresses are fetched with `cbir crawl urls`, not ingested")
    if scheme and scheme not in ("s3", "file"):
        raise UsageError(f"{what} {uri}: only local paths, file:// and s3:// are supported")
    fs, path = open_filesystem(uri, settings.s3)
    try:
        info = fs.get_file_info(path)
    except OSError as exc:
        raise UsageError(f"{what} {uri} is not reachable: {str(exc).splitlines()[0]}") from None
    if info.type == pafs.FileType.NotFound:
        raise UsageError(f"{what} {uri} does not exist")
    if info.type == pafs.FileType.Directory:
        return Source(uri, fs, path, "folder")
    name = _strip_compression(path.lower())
    kind = MANIFEST_FORMATS.get(posixpath.splitext(name)[1], "image")
    source = Source(uri, fs, path, kind)
    if kind in ("csv", "parquet"):
        _check_columns(source, columns, what)
    return source


def read_entries(source: Source) -> Iterator[Entry]:
    if source.kind == "folder":
        yield from _folder_entries(source)
    elif source.kind == "image":
        yield Entry(source.uri_of(source.path))
    else:
        for number, row in enumerate(read_rows(source), start=1):
            if row is not None:  # a blank line
                yield _entry(source, number, row)


def _folder_entries(source: Source) -> Iterator[Entry]:
    selector = pafs.FileSelector(source.path, recursive=True)
    for info in sorted(source.fs.get_file_info(selector), key=lambda i: i.path):
        relative = info.path[len(source.path) :].strip("/")
        hidden = any(part.startswith(".") for part in relative.split("/"))
        if info.type == pafs.FileType.File and not hidden:
            yield Entry(source.uri_of(info.path))


def read_rows(source: Source, max_bytes: int | None = None) -> Iterator[Any]:
    """A manifest's rows: dicts, None for a blank line, an exception for a line that cannot be parsed.
    With max_bytes, TooLarge once the file holds more, decompressed (Parquet: its columns' stated sizes)."""
    if source.kind == "parquet":
        with source.fs.open_input_file(source.path) as raw:
            parquet = pq.ParquetFile(raw)
            groups = [parquet.metadata.row_group(i) for i in range(parquet.metadata.num_row_groups)]
            if max_bytes is not None and sum(group.total_byte_size for group in groups) > max_bytes:
                raise TooLarge(max_bytes)
            for batch in parquet.iter_batches(batch_size=10_000):
                yield from batch.to_pylist()
        return
    with source.fs.open_input_stream(source.path) as raw:  # decompresses by file extension
        if max_bytes is not None:  # read in bounded chunks, counted before they are parsed
            raw = io.BufferedReader(_Capped(raw, max_bytes), buffer_size=CHUNK)
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="")
        if source.kind == "csv":
            yield from csv.DictReader(text)
        elif source.kind == "txt":
            for line in text:
                line = line.strip()
                yield {"uri": line} if line and not line.startswith("#") else None
        else:
            yield from _json_rows(text)


class TooLarge(ValueError):
    """A file over its cap in bytes once decompressed."""

    def __init__(self, max_bytes: int):
        super().__init__(f"over {max_bytes} bytes decompressed")
        self.max_bytes = max_bytes


class _Capped(io.RawIOBase):
    """A (decompressing) stream read in chunks of at most CHUNK bytes; TooLarge once over max_bytes."""

    def __init__(self, raw: Any, max_bytes: int):
        self.raw, self.max_bytes, self.seen = raw, max_bytes, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.raw.read(min(len(buffer), CHUNK))
        self.seen += len(data)
        if self.seen > self.max_bytes:
            raise TooLarge(self.max_bytes)
        buffer[: len(data)] = data
        return len(data)


def _json_rows(text: io.TextIOBase) -> Iterator[Any]:
    head: list[str] = []
    for line in text:
        head.append(line)
        if line.strip():
            break
    if head and head[-1].lstrip().startswith("["):  # a JSON array of objects, not JSON lines
        try:
            yield from json.loads("".join(head) + text.read())
        except json.JSONDecodeError as exc:
            yield ValueError(f"the file is not valid JSON: {exc}")
        return
    for number, line in enumerate(itertools.chain(head, text), start=1):
        if not line.strip():
            yield None
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as exc:
            yield ValueError(f"line {number} is not JSON: {exc.msg}")


def _entry(source: Source, number: int, row: Any, web: bool = False) -> Entry:
    row_uri = f"{source.uri}#row={number}"
    if isinstance(row, Exception):
        return Entry.failed(row_uri, "bad-row", str(row))
    if not isinstance(row, dict):
        return Entry.failed(row_uri, "bad-row", f"expected an object with a uri, got {type(row).__name__}")
    uri = row.get("uri") or (row.get("url") if web else None)
    if not isinstance(uri, str) or not uri.strip():
        return Entry.failed(row_uri, "bad-row", "no uri")
    meta = dict(
        caption=text_value(row.get("caption")),
        title=text_value(row.get("title")),
        tags=_tags(row.get("tags")),
        description=text_value(row.get("description")),
    )
    try:
        return Entry(web_uri(uri) if web else resolve_uri(source, uri), **meta)
    except ValueError as exc:
        return Entry.failed(uri.strip(), "unsupported-uri", str(exc), **meta)


def resolve_url_list(uri: str, settings: Settings) -> Source:
    """A URL list: CSV, JSONL or Parquet with a `uri` (or `url`) column, or text with one URL a line."""
    source = resolve_source(uri, settings, columns=(), what="URL list")
    if source.kind == "folder":
        raise UsageError(f"URL list {uri} is a folder; give a file of URLs")
    if source.kind == "image":  # any other extension: one URL a line
        source = Source(source.uri, source.fs, source.path, "txt")
    if source.kind in ("csv", "parquet") and not {"uri", "url"} & set(columns := _columns(source, "URL list")):
        raise UsageError(f"URL list {uri} has no 'uri' or 'url' column (columns: {', '.join(columns[:10]) or 'none'})")
    return source


def read_web_entries(source: Source) -> Iterator[Entry]:
    """A list of web addresses (any manifest format): only http and https are accepted."""
    for number, row in enumerate(read_rows(source), start=1):
        if row is not None:
            yield _entry(source, number, row, web=True)


def web_uri(uri: str) -> str:
    uri = uri.strip()
    if (uris.scheme(uri) or "").lower() not in ("http", "https"):
        raise ValueError(f"only http and https URLs are crawled, not {uri[:100]!r}")
    return uri


def resolve_uri(source: Source, uri: str) -> str:
    """A uri from a manifest, made absolute: relative ones are relative to the manifest's folder.

    Raises ValueError for web addresses and schemes other than s3:// and file://.
    """
    uri = uri.strip()
    scheme = uris.scheme(uri)
    if scheme in ("http", "https"):
        raise ValueError("web addresses are fetched with `cbir crawl urls`")
    if scheme and scheme not in ("s3", "file"):
        raise ValueError(f"scheme {scheme}:// is not supported")
    if uri.startswith(("s3://", "/")):
        return uri
    if uri.startswith("file://"):
        return uri.removeprefix("file://")
    return source.uri_of(posixpath.normpath(posixpath.join(posixpath.dirname(source.path), uri)))


def text_value(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and value != value):
        return None
    text = str(value).strip()
    return text or None


def _tags(value: Any) -> list[str] | None:
    """A list, or a string of tags separated by commas (or, without commas, by spaces as Flickr does)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        items = [str(item).strip() for item in value if item is not None]
    else:
        text = str(value)
        items = [item.strip() for item in (text.split(",") if "," in text else text.split())]
    return [item for item in items if item] or None


def _strip_compression(name: str) -> str:
    for suffix in COMPRESSIONS:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _check_columns(source: Source, required: tuple[str, ...], what: str) -> None:
    """A manifest without a uri column is a wrong file, not a file of bad rows."""
    columns = _columns(source, what)
    for name in required:
        if name not in columns:
            shown = ", ".join(columns[:10]) or "none"
            raise UsageError(f"{what} {source.uri} has no '{name}' column (columns: {shown})")


def _columns(source: Source, what: str) -> list[str]:
    try:
        if source.kind == "parquet":
            with source.fs.open_input_file(source.path) as raw:
                return pq.read_schema(raw).names
        with source.fs.open_input_stream(source.path) as raw:
            header = io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="").readline()
            return next(csv.reader([header]), [])
    except Exception as exc:  # noqa: BLE001 - any parser's failure is the file's
        raise UsageError(f"{what} {source.uri} cannot be read: {str(exc).splitlines()[0]}") from None


def read_bytes(uri: str, s3: S3, filesystems: dict, max_bytes: int) -> bytes:
    """At most max_bytes + 1 bytes of the item (enough to know it is too large)."""
    if uri.startswith(("http://", "https://")):
        if "web" not in filesystems:
            raise ImageRejected("unsupported-uri", "web addresses are fetched with `cbir crawl urls`")
        return filesystems["web"].fetch(uri)
    scheme = "s3" if uris.is_s3(uri) else "local"
    if scheme not in filesystems:  # one filesystem per task, shared by its threads
        filesystems[scheme] = open_filesystem(uri, s3)[0]
    fs = filesystems[scheme]
    path = uri.removeprefix(uris.S3)
    try:
        with fs.open_input_stream(path) as stream:
            data = stream.read(max_bytes + 1)
    except FileNotFoundError:
        raise ImageRejected("not-found", "no such file") from None
    except OSError as exc:
        raise ImageRejected("unreadable", str(exc).splitlines()[0][:300]) from None
    return data
