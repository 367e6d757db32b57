"""The pages for people: `/` (search box, image upload, results grid) and `/image/{id}` (an image and its
source), Jinja2 templates with every text escaped."""

from __future__ import annotations

from importlib import resources

import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.templating import Jinja2Templates

from cbir.text import highlight
from web.deps import SEARCHER, checked_id, read_upload, shown_details
from web.library import Refused
from web.schemas import FOLD, FORM_K, LIKE, MAX_QUERY, OPTIONAL_Q, OPTIONAL_UPLOAD, UNLIKE, K

router = APIRouter(include_in_schema=False)
_environment = jinja2.Environment(loader=jinja2.PackageLoader("web", "templates"), autoescape=True)
_environment.globals["highlight"] = highlight
TEMPLATES = Jinja2Templates(env=_environment)
STYLE = resources.files("web").joinpath("templates/style.css").read_bytes()


def page(request: Request, name: str, status: int = 200, **context) -> HTMLResponse:
    context = {"q": None, "message": None, "answer": None, "upload": None, **context}
    return TEMPLATES.TemplateResponse(
        request,
        name,
        {"status": request.app.state.searcher.status(), "max_query": MAX_QUERY, **context},
        status_code=status,
    )


@router.get("/", response_class=HTMLResponse)
def home(
    request: Request,
    searcher: SEARCHER,
    q: OPTIONAL_Q = None,
    k: K = None,
    like: LIKE = None,
    unlike: UNLIKE = None,
    fold: FOLD = True,
) -> HTMLResponse:
    """The search page; with results, each has "more like this" and "less like this" boxes, and "search again"
    asks the same text with the images marked (relevance feedback)."""
    searcher.maybe_reload()
    if q is None and not like and not unlike:
        return page(request, "search.html")
    answer = searcher.search(q or None, k or searcher.settings.query.k, like or [], unlike or [], fold)
    return page(request, "search.html", q=q, k=k, answer=answer)


@router.post("/", response_class=HTMLResponse)
def home_upload(request: Request, searcher: SEARCHER, image: OPTIONAL_UPLOAD = None, k: FORM_K = None) -> HTMLResponse:
    searcher.maybe_reload()
    if image is None or not image.filename:
        raise Refused(400, "no-image", "Choose an image to upload first.")
    data = read_upload(searcher, image)
    upload = {"name": image.filename, "caption": None, "preview": None}
    try:
        answer = searcher.search_image(data, k or searcher.settings.query.k)
    except Refused as exc:
        if exc.reason in ("no-match", "empty-index"):  # a good image: show it, and what it was called
            upload["preview"] = searcher.preview(data)
        return page(request, "search.html", exc.status, message=exc.message, upload=upload)
    upload.update(caption=answer.caption, preview=searcher.preview(data))
    return page(request, "search.html", upload=upload, answer=answer)


@router.get("/image/{image_id}", response_class=HTMLResponse)
def image_page(request: Request, searcher: SEARCHER, image_id: str) -> HTMLResponse:
    return page(request, "image.html", d=shown_details(searcher.details(checked_id(image_id))))


@router.get("/style.css")
def stylesheet() -> Response:
    return Response(STYLE, media_type="text/css", headers={"cache-control": "public, max-age=3600"})
