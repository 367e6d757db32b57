"""Queries: a query file (CSV, JSONL or Parquet of query_id, text or image, optional k, optional positive and
negative example images) -> the queries, and an error row (query_id, reason) for each bad row; a file that
cannot be read at all is a UsageError."""

from __future__ import annotations

from dataclasses import dataclass

from cbir.errors import UsageError
from cbir.images import Failure
from cbir.reader import TooLarge, read_rows, resolve_source, resolve_uri, text_value
from cbir.settings import MAX_K, Settings
from cbir.text import words
from search.examples import SIDES, Examples, check_examples, example_refs, is_image_id
from search.rules import QueryRefused, too_long


@dataclass
class Query:
    query_id: str
    k: int
    text: str | None = None
    image: str | None = None
    caption: str | None = None  # generated for an image query
    vector: list[float] | None = None  # the image query's features: its picture, with likeness.image
    image_id: str | None = None  # the image query's, once read
    positive: tuple[str, ...] = ()  # example images: image ids of the lake, or absolute paths and URIs
    negative: tuple[str, ...] = ()
    examples: Examples | None = None  # once the examples are resolved (search.examples)

    @property
    def words(self) -> list[str]:
        return words(self.text if self.text is not None else self.caption)


def read_queries(uri: str, settings: Settings) -> tuple[list[Query], list[tuple[str, str]]]:
    """Queries and (query_id, reason) errors; a file that cannot be read at all is a UsageError."""
    source = resolve_source(uri, settings, columns=("query_id",), what="query file")
    if source.kind not in ("csv", "jsonl", "parquet"):
        raise UsageError(f"query file {uri}: expected CSV, JSONL or Parquet with query_id and text or image")
    queries, errors, seen = [], [], set()
    for number, row in enumerate(_rows(source, uri, settings), start=1):
        if row is None:
            continue
        if not isinstance(row, dict):
            errors.append(
                (f"#row={number}", Failure.of("bad-row", str(row) if isinstance(row, Exception) else "not an object"))
            )
            continue
        query_id = text_value(row.get("query_id"))
        if query_id is None:
            errors.append((f"#row={number}", Failure.of("bad-row", "no query_id")))
            continue
        if query_id in seen:
            errors.append((query_id, Failure.of("duplicate-id", f"query_id {query_id} is used by an earlier row")))
            continue
        seen.add(query_id)
        query, error = _query(source, query_id, row, settings)
        if error:
            errors.append((query_id, error))
        else:
            queries.append(query)
    return queries, errors


def _rows(source, uri: str, settings: Settings) -> list:
    """The file's rows, read within query.max_file_bytes (decompressed) and query.max_rows."""
    limits, rows, count = settings.query, [], 0
    try:
        for row in read_rows(source, max_bytes=limits.max_file_bytes):
            count += row is not None
            if count > limits.max_rows:
                raise UsageError(f"query file {uri} has more than query.max_rows={limits.max_rows} rows")
            rows.append(row)
    except TooLarge:
        raise UsageError(
            f"query file {uri} is over query.max_file_bytes={limits.max_file_bytes} bytes (decompressed)"
        ) from None
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parser's failure is the file's
        raise UsageError(f"query file {uri} cannot be read: {str(exc).splitlines()[0]}") from None
    return rows


def _query(source, query_id: str, row: dict, settings: Settings) -> tuple[Query | None, Failure | None]:
    text, image = text_value(row.get("text")), text_value(row.get("image"))
    k = row.get("k")
    if k is None or (isinstance(k, float) and k != k) or k == "":
        k = settings.query.k
    try:
        k = int(str(k).strip())
        if not 1 <= k <= MAX_K:
            raise ValueError
    except (TypeError, ValueError):
        return None, Failure.of("bad-k", f"k must be a whole number from 1 to {MAX_K}, got {row.get('k')!r}")
    if text and image:
        return None, Failure.of("bad-row", "give text or image, not both")
    try:
        positive, negative = (_examples(source, row.get(side), side) for side in SIDES)
        check_examples(positive, negative, settings.query.max_examples, has_text=bool(text))
    except QueryRefused as exc:
        return None, Failure.of(exc.reason, str(exc))
    if (positive or negative) and image:
        return None, Failure.of("bad-row", "give the image as a positive example, beside the others")
    if positive and not text:
        return Query(query_id, k, positive=positive, negative=negative), None
    if image:
        try:
            return Query(query_id, k, image=resolve_uri(source, image)), None
        except ValueError as exc:
            return None, Failure.of("unsupported-uri", str(exc))
    if text is None:
        return None, Failure.of("bad-row", "no text and no image")
    if long := too_long(text, settings.query.max_words):  # before anything else reads the whole text
        return None, Failure.of("too-long", long)
    if not words(text):
        return None, Failure.of("empty-text", "the text has no words")
    return Query(query_id, k, text=text, positive=positive, negative=negative), None


def _examples(source, value, side: str) -> tuple[str, ...]:
    """A row's examples of one side: image ids kept, paths and URIs made absolute (as an image's)."""
    names = []
    for name in example_refs(value, f"{side} examples"):
        try:
            names.append(name if is_image_id(name) else resolve_uri(source, name))
        except ValueError as exc:
            raise QueryRefused("unsupported-uri", f"{side} example {name}: {exc}") from None
    return tuple(names)
