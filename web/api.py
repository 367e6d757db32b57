"""The JSON API (OpenAPI schema at /openapi.json) and the stored image bytes."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from web.deps import SEARCHER, checked_id, read_upload, shown_details, shown_uri
from web.library import Answer, Result
from web.schemas import (
    ERRORS,
    FOLD,
    FORM_K,
    IMAGE_RESPONSES,
    LIKE,
    OPTIONAL_Q,
    UNLIKE,
    UPLOAD,
    UPLOAD_ERRORS,
    ErrorOut,
    ImageOut,
    K,
    ResultOut,
    SearchOut,
    StatusOut,
)

router = APIRouter()
CACHED = {"cache-control": "public, max-age=86400, immutable"}  # an image id names its bytes


def result_out(r: Result) -> ResultOut:
    return ResultOut(
        rank=r.rank,
        image_id=r.image_id,
        score=r.score,
        caption=r.caption,
        uri=shown_uri(r.uri),
        matched_kind=r.matched_kind,
        matched_text=r.matched_text,
        example=r.example,
        image_url=f"/img/{r.image_id}",
        thumbnail_url=f"/thumb/{r.image_id}",
        page_url=f"/image/{r.image_id}",
        folded=[result_out(copy) for copy in r.folded],
    )


def search_out(answer: Answer, text: str | None, k: int) -> SearchOut:
    results = [result_out(r) for r in answer.results]
    return SearchOut(
        query=text,
        caption=answer.caption,
        words=answer.words,
        k=k,
        count=len(answer.results),
        took_ms=answer.took_ms,
        caption_ms=answer.extra.get("caption_ms"),
        model_version=answer.version,
        captions=answer.captions,
        like=answer.like,
        unlike=answer.unlike,
        left_out=answer.left_out,
        results=results,
    )


@router.get(
    "/api/search",
    response_model=SearchOut,
    responses=ERRORS,
    tags=["search"],
    summary="Search by text, by example images of the index (more like these, less like those), or both",
)
def api_search_text(
    searcher: SEARCHER,
    q: OPTIONAL_Q = None,
    k: K = None,
    like: LIKE = None,
    unlike: UNLIKE = None,
    fold: FOLD = True,
) -> SearchOut:
    searcher.maybe_reload()
    k = k or searcher.settings.query.k
    return search_out(searcher.search(q, k, like or [], unlike or [], fold), q, k)


@router.post(
    "/api/search",
    response_model=SearchOut,
    responses=UPLOAD_ERRORS,
    tags=["search"],
    summary="Search by image: the image is captioned, then its caption is searched for",
)
def api_search_image(searcher: SEARCHER, image: UPLOAD, k: FORM_K = None) -> SearchOut:
    searcher.maybe_reload()
    k = k or searcher.settings.query.k
    return search_out(searcher.search_image(read_upload(searcher, image), k), None, k)


@router.get(
    "/api/images/{image_id}",
    response_model=ImageOut,
    responses={404: {"model": ErrorOut}},
    tags=["images"],
    summary="An indexed image's caption and source metadata",
)
def api_image(searcher: SEARCHER, image_id: str) -> ImageOut:
    return ImageOut(**shown_details(searcher.details(checked_id(image_id))))


@router.get("/api/status", response_model=StatusOut, tags=["status"], summary="What the index holds")
def api_status(searcher: SEARCHER) -> StatusOut:
    searcher.maybe_reload()
    return StatusOut(**searcher.status())


@router.get(
    "/img/{image_id}", response_class=Response, responses=IMAGE_RESPONSES, tags=["images"], summary="The stored image"
)
def image_bytes(searcher: SEARCHER, image_id: str) -> Response:
    data, media_type = searcher.image(checked_id(image_id))
    return Response(data, media_type=media_type, headers=CACHED)


@router.get(
    "/thumb/{image_id}",
    response_class=Response,
    responses=IMAGE_RESPONSES,
    tags=["images"],
    summary="A JPEG thumbnail of the stored image",
)
def image_thumbnail(searcher: SEARCHER, image_id: str) -> Response:
    return Response(searcher.thumbnail(checked_id(image_id)), media_type="image/jpeg", headers=CACHED)
