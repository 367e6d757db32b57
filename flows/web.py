"""cbir web: a search page for people and the JSON API behind it, over the lake's index.

FastAPI with Jinja2 templates (every text escaped), served by uvicorn. The index is built once
at start-up and swapped for a new one when a newer index run is committed (flows/searcher.py);
the captioner for uploads is loaded once, in the background, as the server starts.

Pages: `/` (search box, image upload, results grid), `/image/{id}` (an image and its source).
API (OpenAPI schema at /openapi.json): `GET /api/search?q=&k=`, `POST /api/search` (multipart
`image`, optional `k`), `GET /api/images/{id}`, `GET /api/status`, and the stored image bytes at
`/img/{id}` and `/thumb/{id}`. Bad input is a 4xx: `{"error": message, "reason": slug}` from the
API, the message on the page. Image ids are checked (64 hex digits, indexed) before anything is
read, so no request names a path; no response carries a traceback.
"""

from __future__ import annotations

import logging
import re
import sys
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated

import jinja2
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from cbir.settings import Settings
from cbir.text import highlight
from flows.searcher import Answer, Refused, Searcher

log = logging.getLogger("cbir.web")

IMAGE_ID = re.compile(r"[0-9a-f]{64}")
MAX_QUERY = 1000  # characters
FORM_OVERHEAD = 64 * 1024  # multipart headers and the other fields, besides the image itself
DRAIN_LIMIT = 256 * 2**20  # read (and drop) at most this much of a refused upload, so the browser sees the answer
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; img-src 'self' data:; style-src 'self'; form-action 'self'; "
                               "base-uri 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}
API_PREFIXES = ("/api/", "/img/", "/thumb/", "/openapi")


# What the API answers.
class ErrorOut(BaseModel):
    error: str = Field(description="what was wrong, in a sentence")
    reason: str = Field(description="a short slug: empty-query, no-match, too-large, not-an-image, unknown-image, ...")


class ResultOut(BaseModel):
    rank: int = Field(description="1 is best; ties by image_id")
    image_id: str = Field(description="sha256 of the image bytes")
    score: float = Field(description="BLEU of the query against the image's texts (nltk sentence_bleu)")
    caption: str = Field(description="the image's indexed caption")
    matched_kind: str | None = Field(description="which of its texts matched the query best: caption, label, title, "
                                                 "description, tags or given")
    matched_text: str | None = Field(description="that text")
    uri: str | None = Field(description="where the image came from (a web address; of a server file, its name)")
    image_url: str = Field(description="the stored image")
    thumbnail_url: str = Field(description="a JPEG of at most 240 x 240 pixels")
    page_url: str = Field(description="the image's page, with its source metadata")


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
    index_runs: list[str] = Field(description="the committed index runs the index was built from")
    loaded_at: str
    load_seconds: float
    captioner: str = Field(description="the captioner for uploads: not loaded, loading V, loaded V, unavailable: why")


# Parameters (module level: FastAPI resolves the annotations by name).
Q = Annotated[str, Query(max_length=MAX_QUERY, description="words that describe a picture")]
OPTIONAL_Q = Annotated[str | None, Query(max_length=MAX_QUERY, description="words that describe a picture")]
K = Annotated[int | None, Query(ge=1, le=1000, description="how many results (default: the setting query.k)")]
FORM_K = Annotated[int | None, Form(ge=1, le=1000, description="how many results (default: the setting query.k)")]
UPLOAD = Annotated[UploadFile, File(description="a JPEG, PNG, GIF, WebP, BMP or TIFF image")]
OPTIONAL_UPLOAD = Annotated[UploadFile | None, File(description="the image")]
ERRORS = {status: {"model": ErrorOut} for status in (400, 404, 413, 415, 422)}
UPLOAD_ERRORS = {**ERRORS, 503: {"model": ErrorOut, "description": "no captioner to describe images with"}}
IMAGE_RESPONSES = {200: {"content": {"image/*": {}}, "description": "the image bytes"}, 404: {"model": ErrorOut}}


def create_app(settings: Settings, searcher: Searcher | None = None, warm_up: bool = True) -> FastAPI:
    """The application; building the Searcher loads the index (once, at start-up)."""
    searcher = searcher or Searcher(settings)
    default_k = settings.query.k

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if warm_up:
            searcher.warm_up()  # in the background: pages and text search serve at once
        yield

    app = FastAPI(title="cbir", version="1", lifespan=lifespan, docs_url=None, redoc_url=None, redirect_slashes=False,
                  description="Caption-based image search: by text, or by an image that is captioned first; "
                              "images are ranked by BLEU between the query and their texts.")
    app.state.searcher = searcher
    environment = jinja2.Environment(loader=jinja2.PackageLoader("flows", "templates"), autoescape=True)
    environment.globals["highlight"] = highlight
    templates = Jinja2Templates(env=environment)
    style = resources.files("flows").joinpath("templates/style.css").read_bytes()

    def page(request: Request, name: str, status: int = 200, **context) -> HTMLResponse:
        context = {"q": None, "message": None, "answer": None, "upload": None, **context}
        return templates.TemplateResponse(request, name, {"status": searcher.status(), "max_query": MAX_QUERY,
                                                          **context}, status_code=status)

    def problem(request: Request, status: int, reason: str, message: str) -> Response:
        if request.url.path.startswith(API_PREFIXES):
            return JSONResponse({"error": message, "reason": reason}, status_code=status)
        return page(request, "search.html", status, message=message, q=request.query_params.get("q"))

    # Errors: a 4xx with a message, never a traceback.
    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> Response:
        return problem(request, exc.status, exc.reason, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        messages = {404: ("not-found", "There is no such page."), 405: ("method-not-allowed", "Method not allowed.")}
        reason, message = messages.get(exc.status_code, ("bad-request", str(exc.detail)))
        return problem(request, exc.status_code, reason, message)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ())[1:]) or "request"
        message = f"{where}: {first.get('msg', 'invalid')}"
        status = 422 if request.url.path.startswith(API_PREFIXES) else 400
        return problem(request, status, "bad-request", message)

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> Response:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        message = "The server failed to answer; its log has the details."
        try:
            return problem(request, 500, "internal", message)
        except Exception:  # noqa: BLE001 - the page itself may be what fails
            return JSONResponse({"error": message, "reason": "internal"}, status_code=500)

    def results(answer: Answer) -> list[ResultOut]:
        return [ResultOut(rank=r.rank, image_id=r.image_id, score=r.score, caption=r.caption, uri=shown_uri(r.uri),
                          matched_kind=r.matched_kind, matched_text=r.matched_text,
                          image_url=f"/img/{r.image_id}", thumbnail_url=f"/thumb/{r.image_id}",
                          page_url=f"/image/{r.image_id}") for r in answer.results]

    def search_out(answer: Answer, text: str | None, k: int) -> SearchOut:
        return SearchOut(query=text, caption=answer.caption, words=answer.words, k=k, count=len(answer.results),
                         took_ms=answer.took_ms, caption_ms=answer.extra.get("caption_ms"),
                         model_version=answer.version, captions=answer.captions, results=results(answer))

    def checked_id(image_id: str) -> str:
        if not IMAGE_ID.fullmatch(image_id):
            raise Refused(404, "unknown-image", "No indexed image has this id (ids are 64 hex digits).")
        return image_id

    def read_upload(upload: UploadFile) -> bytes:
        return upload.file.read(settings.web.max_upload_bytes + 1)

    # The API.
    @app.get("/api/search", response_model=SearchOut, responses=ERRORS, tags=["search"],
             summary="Search by text")
    def api_search_text(q: Q, k: K = None) -> SearchOut:
        searcher.maybe_reload()
        return search_out(searcher.search_text(q, k or default_k), q, k or default_k)

    @app.post("/api/search", response_model=SearchOut, responses=UPLOAD_ERRORS, tags=["search"],
              summary="Search by image: the image is captioned, then its caption is searched for")
    def api_search_image(image: UPLOAD, k: FORM_K = None) -> SearchOut:
        searcher.maybe_reload()
        return search_out(searcher.search_image(read_upload(image), k or default_k), None, k or default_k)

    @app.get("/api/images/{image_id}", response_model=ImageOut, responses={404: {"model": ErrorOut}},
             tags=["images"], summary="An indexed image's caption and source metadata")
    def api_image(image_id: str) -> ImageOut:
        return ImageOut(**shown_details(searcher.details(checked_id(image_id))))

    @app.get("/api/status", response_model=StatusOut, tags=["status"], summary="What the index holds")
    def api_status() -> StatusOut:
        searcher.maybe_reload()
        return StatusOut(**searcher.status())

    @app.get("/img/{image_id}", response_class=Response, responses=IMAGE_RESPONSES, tags=["images"],
             summary="The stored image")
    def image_bytes(image_id: str) -> Response:
        data, media_type = searcher.image(checked_id(image_id))
        return Response(data, media_type=media_type, headers={"cache-control": "public, max-age=86400, immutable"})

    @app.get("/thumb/{image_id}", response_class=Response, responses=IMAGE_RESPONSES, tags=["images"],
             summary="A JPEG thumbnail of the stored image")
    def image_thumbnail(image_id: str) -> Response:
        data = searcher.thumbnail(checked_id(image_id))
        return Response(data, media_type="image/jpeg", headers={"cache-control": "public, max-age=86400, immutable"})

    # The pages.
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def home(request: Request, q: OPTIONAL_Q = None, k: K = None) -> HTMLResponse:
        searcher.maybe_reload()
        if q is None:
            return page(request, "search.html")
        return page(request, "search.html", q=q, answer=searcher.search_text(q, k or default_k))

    @app.post("/", response_class=HTMLResponse, include_in_schema=False)
    def home_upload(request: Request, image: OPTIONAL_UPLOAD = None, k: FORM_K = None) -> HTMLResponse:
        searcher.maybe_reload()
        if image is None or not image.filename:
            raise Refused(400, "no-image", "Choose an image to upload first.")
        data = read_upload(image)
        upload = {"name": image.filename, "caption": None, "preview": None}
        try:
            answer = searcher.search_image(data, k or default_k)
        except Refused as exc:
            if exc.reason in ("no-match", "empty-index"):  # a good image: show it, and what it was called
                upload["preview"] = searcher.preview(data)
            return page(request, "search.html", exc.status, message=exc.message, upload=upload)
        upload.update(caption=answer.caption, preview=searcher.preview(data))
        return page(request, "search.html", upload=upload, answer=answer)

    @app.get("/image/{image_id}", response_class=HTMLResponse, include_in_schema=False)
    def image_page(request: Request, image_id: str) -> HTMLResponse:
        return page(request, "image.html", d=shown_details(searcher.details(checked_id(image_id))))

    @app.get("/style.css", include_in_schema=False)
    def stylesheet() -> Response:
        return Response(style, media_type="text/css", headers={"cache-control": "public, max-age=3600"})

    # Only names this server is known by: a page that rebinds its own name to 127.0.0.1 is refused.
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=trusted_hosts(settings))
    app.add_middleware(Guard, max_body=settings.web.max_upload_bytes + FORM_OVERHEAD,
                       too_large=lambda request: problem(
                           request, 413, "too-large",
                           f"The upload is larger than web.max_upload_bytes={settings.web.max_upload_bytes} bytes."))
    return app


def shown_uri(uri: str | None) -> str | None:
    """A URI as clients see it: web addresses whole; the server's own paths (local files, buckets) by
    their file name only, so no answer tells where the server keeps things."""
    if not uri or uri.startswith(("http://", "https://")):
        return uri
    return uri.rstrip("/").rsplit("/", 1)[-1] or None


def shown_details(details: dict) -> dict:
    return {**details, "uri": shown_uri(details["uri"]), "source": shown_uri(details["source"]),
            "also_at": sorted({shown_uri(uri) for uri in details["also_at"]} - {None})}


def trusted_hosts(settings: Settings) -> list[str]:
    listen = settings.web.host
    named = [] if listen in ("0.0.0.0", "::") else [listen]  # listening everywhere names no host
    return ["127.0.0.1", "localhost", *named, *settings.web.trusted_hosts]


class Guard:
    """Security headers on every response; request bodies over max_body refused (413) before any parsing."""

    def __init__(self, app, max_body: int, too_large):
        self.app, self.max_body, self.too_large = app, max_body, too_large

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_secured(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send_secured)
        declared = Headers(scope=scope).get("content-length", "")
        chunks, size, more = [], 0, True
        if declared.isdigit() and int(declared) > self.max_body:
            size = self.max_body + 1
        while more and size <= self.max_body:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
        if size > self.max_body:
            while more and size < DRAIN_LIMIT:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                size += len(message.get("body", b""))
                more = message.get("more_body", False)
            response = self.too_large(Request(scope))
            return await response(scope, receive, send_secured)

        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send_secured)


def serve(settings: Settings, host: str | None = None, port: int | None = None) -> None:
    """Load the index, then serve until interrupted."""
    import uvicorn

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s cbir web: %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    host, port = host or settings.web.host, port or settings.web.port
    app = create_app(settings)
    status = app.state.searcher.status()
    print(f"cbir web: {status['captions']} captions (captioner {status['model_version'] or 'none yet'}) "
          f"at http://{host}:{port}/", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="warning", server_header=False)
