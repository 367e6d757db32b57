"""What the JSON API answers and asks: response models and parameters (module level: FastAPI resolves the
annotations by name)."""

from __future__ import annotations

from typing import Annotated

from fastapi import File, Form, Query, UploadFile
from pydantic import BaseModel, Field

from cbir.settings import MAX_K

MAX_QUERY = 1000  # characters


class ErrorOut(BaseModel):
    error: str = Field(description="what was wrong, in a sentence")
    reason: str = Field(description="a short slug: empty-query, no-match, too-large, not-an-image, unknown-image, ...")


class ResultOut(BaseModel):
    rank: int = Field(description="1 is best; ties by image_id")
    image_id: str = Field(description="sha256 of the image bytes")
    score: float = Field(
        description="BLEU of the query against the image's texts (nltk sentence_bleu); for a query with a picture "
        "(a text query's from the captioner's memory; an image query's own, with likeness.image), (1 - w) x BLEU "
        "+ w x the image's likeness (cosine) to that picture, w being likeness.text_weight or likeness.image_weight, "
        "or the weighted likeness alone for an image found by likeness"
    )
    caption: str = Field(description="the image's indexed caption")
    matched_kind: str | None = Field(
        description="which of its texts matched the query best: caption, label, title, description, tags or given"
    )
    matched_text: str | None = Field(description="that text")
    example: str | None = Field(None, description="for a query with positive examples: the one it resembles most")
    uri: str | None = Field(description="where the image came from (a web address; of a server file, its name)")
    image_url: str = Field(description="the stored image")
    thumbnail_url: str = Field(description="a JPEG of at most 240 x 240 pixels")
    page_url: str = Field(description="the image's page, with its source metadata")
    folded: list[ResultOut] = Field(
        [], description="its near-duplicates ranked below it, folded under it (duplicates.threshold; fold=false: none)"
    )


class SearchOut(BaseModel):
    query: str | None = Field(description="the text asked; null for an image")
    caption: str | None = Field(description="the caption generated for the uploaded image; null for text")
    words: list[str] = Field(description="the words searched for")
    k: int
    count: int = Field(description="results returned (at most k; images that score 0 are not results)")
    took_ms: float = Field(description="time in the index")
    caption_ms: float | None = Field(None, description="time to caption the uploaded image")
    model_version: str | None = Field(description="the captioner version whose captions were searched")
    captions: int = Field(description="captions in the index")
    like: list[str] = Field([], description="the positive example images used (image ids)")
    unlike: list[str] = Field([], description="the negative example images used (image ids)")
    left_out: list[str] = Field([], description="example images that could not be used: which, and why")
    results: list[ResultOut]


class ImageOut(BaseModel):
    image_id: str
    caption: str
    uri: str | None
    format: str | None
    width: int | None
    height: int | None
    bytes: int | None
    title: str | None
    tags: list[str]
    license: str | None = Field(description="the source's license id")
    license_name: str | None = Field(description="the license's name, where the source is known (Flickr)")
    owner: str | None
    source_id: str | None
    taken_at: str | None
    page_url: str | None = Field(description="the photo's page at its source (http or https only)")
    source: str | None = Field(description="what was ingested: a folder, a prefix or a manifest file (its name)")
    ingested_at: str | None
    also_at: list[str] = Field(description="other uris with the same bytes")
    model_version: str | None


class StatusOut(BaseModel):
    captions: int = Field(description="captions in the index")
    model_version: str | None = Field(description="the captioner version whose captions are indexed")
    captions_version: int | None = Field(description="the captions table's Delta version the index was built from")
    loaded_at: str
    load_seconds: float
    captioner: str = Field(description="the captioner for uploads: not loaded, loading V, loaded V, unavailable: why")


# Parameters (module level: FastAPI resolves the annotations by name).
OPTIONAL_Q = Annotated[str | None, Query(max_length=MAX_QUERY, description="words that describe a picture")]
FOLD = Annotated[
    bool, Query(description="fold near-duplicates under the first of them (with the setting duplicates.fold)")
]
LIKE = Annotated[list[str] | None, Query(description="more like this: an indexed image's id (repeat for several)")]
UNLIKE = Annotated[list[str] | None, Query(description="less like this: an indexed image's id (repeat for several)")]
K = Annotated[int | None, Query(ge=1, le=MAX_K, description="how many results (default: the setting query.k)")]
FORM_K = Annotated[int | None, Form(ge=1, le=MAX_K, description="how many results (default: the setting query.k)")]
UPLOAD = Annotated[UploadFile, File(description="a JPEG, PNG, GIF, WebP, BMP or TIFF image")]
OPTIONAL_UPLOAD = Annotated[UploadFile | None, File(description="the image")]
ERRORS = {status: {"model": ErrorOut} for status in (400, 404, 413, 415, 422)}
UPLOAD_ERRORS = {
    **ERRORS,
    408: {"model": ErrorOut, "description": "the upload did not arrive within web.upload_timeout_s"},
    503: {
        "model": ErrorOut,
        "description": "no captioner to describe images with, or web.max_uploads uploads already in flight "
        "(the Retry-After header says when to try again)",
    },
}
IMAGE_RESPONSES = {200: {"content": {"image/*": {}}, "description": "the image bytes"}, 404: {"model": ErrorOut}}
