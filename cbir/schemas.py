"""Arrow schemas of the lake's tables; docs/reference.md's table reference is written from these."""

import pyarrow as pa


def _field(name: str, type_: pa.DataType, doc: str) -> pa.Field:
    return pa.field(name, type_, metadata={"doc": doc})


# An image's texts that BLEU ranks against, each with its kind and rank among its kind; score is the
# caption's log-probability or the label's probability.
REFERENCE = pa.struct([("kind", pa.string()), ("rank", pa.int32()), ("text", pa.string()), ("score", pa.float64())])
REFERENCES = pa.list_(REFERENCE)

MANIFEST = pa.schema(
    [
        _field("image_id", pa.string(), "sha256 of the image bytes (hex); null when the item failed"),
        _field("source", pa.string(), "what was ingested: a folder, a prefix or a manifest file"),
        _field("uri", pa.string(), "where this item came from"),
        _field("format", pa.string(), "image format as Pillow names it: JPEG, PNG, ..."),
        _field("width", pa.int32(), "pixels"),
        _field("height", pa.int32(), "pixels"),
        _field("bytes", pa.int64(), "size of the image file"),
        _field("status", pa.string(), "ok, duplicate (same bytes as an image already stored) or failed"),
        _field("error", pa.string(), "why it failed: '<reason>: <detail>'"),
        _field("reason", pa.string(), "the error's reason alone (rows written before it have none)"),
        _field("title", pa.string(), "source title, if any"),
        _field("description", pa.string(), "source description, if any"),
        _field("tags", pa.list_(pa.string()), "source tags, if any"),
        _field("caption", pa.string(), "a caption that came with the image, if any"),
        _field("source_id", pa.string(), "the photo's id at its source (flickr:<id>), if crawled from an API"),
        _field("owner", pa.string(), "the photo's owner at its source, if known"),
        _field("license", pa.string(), "the source's license id, if known (Flickr: 0-10)"),
        _field("taken_at", pa.string(), "when the photo was taken, as the source gives it"),
        _field("page_url", pa.string(), "the photo's page at its source"),
        _field("ingested_at", pa.timestamp("us", tz="UTC"), "when the run started"),
        _field("run_id", pa.string(), "the ingest run that wrote the row"),
    ]
)

# Columns added since the tables became Delta tables: a table without them reads them as nulls, and the next
# write adds them to its schema (a table missing any other column of cbir's is foreign).
ADDED_LATER = frozenset({"visual", "example"})
CAPTIONS = pa.schema(
    [
        _field("image_id", pa.string(), "sha256 of the image bytes"),
        _field("uri", pa.string(), "where the image came from (its first uri in the manifest)"),
        _field("caption", pa.string(), "the generated caption, without startseq/endseq; null when failed"),
        _field("logprob", pa.float64(), "the caption's log-probability under the model"),
        _field(
            "references", REFERENCES, "the image's generated texts: kind (caption, label, neighbour), rank, text, score"
        ),
        _field(
            "visual",
            pa.binary(),
            "the image's features in the captioner memory's space: float16 little-endian unit vector; "
            "null without a memory (rows written before it have none)",
        ),
        _field("model_version", pa.string(), "the captioner version that wrote it"),
        _field("status", pa.string(), "ok or failed"),
        _field("error", pa.string(), "why it failed: '<reason>: <detail>'"),
        _field("reason", pa.string(), "the error's reason alone (rows written before it have none)"),
        _field("indexed_at", pa.timestamp("us", tz="UTC"), "when the run started"),
        _field("run_id", pa.string(), "the index run that wrote the row"),
    ]
)

RESULTS = pa.schema(
    [
        _field("query_id", pa.string(), "the query's id from the query file"),
        _field("rank", pa.int32(), "1 is best: by score; ties by image_id"),
        _field("image_id", pa.string(), "sha256 of the image bytes"),
        _field("uri", pa.string(), "where the image came from"),
        _field("caption", pa.string(), "the image's indexed caption"),
        _field(
            "score",
            pa.float64(),
            "BLEU of the query against the image's texts (nltk sentence_bleu); for a query with a picture, "
            "(1 - w) x BLEU + w x the image's likeness to it",
        ),
        _field(
            "matched_kind",
            pa.string(),
            "the kind of the text that matched the query best: caption, label, title, description, tags or given",
        ),
        _field("matched_text", pa.string(), "that text"),
        _field("query_caption", pa.string(), "the caption generated for an image query; null for text"),
        _field(
            "likeness",
            pa.float64(),
            "the image's likeness (cosine) to the query's picture, where one ranked it; null otherwise",
        ),
        _field(
            "example",
            pa.string(),
            "for a query with positive example images: the one this image resembles most (as the query named it)",
        ),
        _field("run_id", pa.string(), "the query run"),
    ]
)

ERRORS = pa.schema(
    [
        _field("query_id", pa.string(), "the query's id, or '#row=N' when the row has none"),
        _field("error", pa.string(), "why it was not answered: '<reason>: <detail>'"),
        _field("reason", pa.string(), "the error's reason alone"),
        _field("run_id", pa.string(), "the query run"),
    ]
)

SCHEMAS = {"manifest": MANIFEST, "captions": CAPTIONS}


def subschema(schema: pa.Schema, names: list[str]) -> pa.Schema:
    """These columns of a schema, in this order."""
    return pa.schema([schema.field(name) for name in names])


def features_schema(dim: int, dtype: str) -> pa.Schema:
    """One table per encoder: its vectors have a fixed length that pyarrow, DuckDB and Spark read as arrays."""
    value = {"float16": pa.float16(), "float32": pa.float32()}[dtype]
    return pa.schema(
        [
            _field("image_id", pa.string(), "sha256 of the image bytes"),
            _field("vector", pa.list_(value, dim), "the encoder's features"),
            _field("run_id", pa.string(), "the run that computed them"),
        ]
    )
