"""cbir web: a search page for people and the JSON API behind it, over the lake's index.

FastAPI with Jinja2 templates (every text escaped), served by uvicorn. The index is built once
at start-up and swapped for a new one when a newer index run is committed (web/library.py);
the captioner for uploads is loaded once, in the background, as the server starts.

Pages (web/pages.py): `/` (search box, image upload, results grid), `/image/{id}` (an image and its
source). API (web/api.py, OpenAPI schema at /openapi.json): `GET /api/search?q=&k=`, `POST /api/search`
(multipart `image`, optional `k`), `GET /api/images/{id}`, `GET /api/status`, and the stored image
bytes at `/img/{id}` and `/thumb/{id}`. Bad input is a 4xx: `{"error": message, "reason": slug}` from
the API, the message on the page. Image ids are checked (64 hex digits, indexed) before anything is
read, so no request names a path; no response carries a traceback.
"""

from __future__ import annotations

import logging
import sys
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from cbir.settings import Settings
from web import api, pages
from web.library import Library, Refused
from web.middleware import FORM_OVERHEAD, Guard, trusted_hosts

log = logging.getLogger("cbir.web")

API_PREFIXES = ("/api/", "/img/", "/thumb/", "/openapi")


def create_app(settings: Settings, searcher: Library | None = None, warm_up: bool = True) -> FastAPI:
    """The application; building the Library loads the index (once, at start-up)."""
    searcher = searcher or Library(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if warm_up:
            app.state.searcher.warm_up()  # in the background: pages and text search serve at once
        yield

    app = FastAPI(
        title="cbir",
        version="1",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        redirect_slashes=False,
        description="Caption-based image search: by text, or by an image that is captioned first; "
        "images are ranked by BLEU between the query and their texts, blended for text queries with likeness "
        "to a picture the words borrow from the captioner's memory.",
    )
    app.state.searcher = searcher
    app.include_router(api.router)
    app.include_router(pages.router)
    for exception, handler in HANDLERS.items():
        app.add_exception_handler(exception, handler)
    # Only names this server is known by: a page that rebinds its own name to 127.0.0.1 is refused.
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=trusted_hosts(settings))
    web = settings.web
    refusals = {
        "too-large": f"The upload is larger than web.max_upload_bytes={web.max_upload_bytes} bytes.",
        "busy": f"The server is already taking web.max_uploads={web.max_uploads} uploads: try again in a few seconds.",
        "upload-timeout": f"The upload did not arrive within web.upload_timeout_s={web.upload_timeout_s:g} seconds.",
    }
    app.add_middleware(
        Guard,
        max_body=web.max_upload_bytes + FORM_OVERHEAD,
        max_uploads=web.max_uploads,
        timeout_s=web.upload_timeout_s,
        refuse=lambda request, status, reason: problem(request, status, reason, refusals[reason]),
    )
    return app


# Errors: a 4xx with a message, never a traceback; JSON for the API, the page for people.
def problem(request: Request, status: int, reason: str, message: str) -> Response:
    if request.url.path.startswith(API_PREFIXES):
        return JSONResponse({"error": message, "reason": reason}, status_code=status)
    return pages.page(request, "search.html", status, message=message, q=request.query_params.get("q"))


async def refused(request: Request, exc: Refused) -> Response:
    return problem(request, exc.status, exc.reason, exc.message)


async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
    messages = {404: ("not-found", "There is no such page."), 405: ("method-not-allowed", "Method not allowed.")}
    reason, message = messages.get(exc.status_code, ("bad-request", str(exc.detail)))
    return problem(request, exc.status_code, reason, message)


async def invalid(request: Request, exc: RequestValidationError) -> Response:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(part) for part in first.get("loc", ())[1:]) or "request"
    status = 422 if request.url.path.startswith(API_PREFIXES) else 400
    return problem(request, status, "bad-request", f"{where}: {first.get('msg', 'invalid')}")


async def failed(request: Request, exc: Exception) -> Response:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    message = "The server failed to answer; its log has the details."
    try:
        return problem(request, 500, "internal", message)
    except Exception:  # noqa: BLE001 - the page itself may be what fails
        return JSONResponse({"error": message, "reason": "internal"}, status_code=500)


HANDLERS = {Refused: refused, StarletteHTTPException: http_error, RequestValidationError: invalid, Exception: failed}


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
    print(
        f"cbir web: {status['captions']} captions (captioner {status['model_version'] or 'none yet'}) "
        f"at http://{host}:{port}/",
        file=sys.stderr,
    )
    uvicorn.run(app, host=host, port=port, log_level="warning", server_header=False)
