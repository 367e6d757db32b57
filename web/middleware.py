"""The application's guards: security headers on every response, uploads bounded before any parsing (in
size, in number at once, in the time their bodies take), and only the Host names this server is known by."""

from __future__ import annotations

import asyncio
import threading

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request

from cbir.settings import Settings

FORM_OVERHEAD = 64 * 1024  # multipart headers and the other fields, besides the image itself
DRAIN_LIMIT = 256 * 2**20  # read (and drop) at most this much of a refused upload, so the browser sees the answer
RETRY_AFTER_S = 5  # an upload refused while web.max_uploads are in flight: try again after this many seconds
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; img-src 'self' data:; style-src 'self'; form-action 'self'; "
    "base-uri 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


def trusted_hosts(settings: Settings) -> list[str]:
    listen = settings.web.host
    named = [] if listen in ("0.0.0.0", "::") else [listen]  # listening everywhere names no host
    return ["127.0.0.1", "localhost", *named, *settings.web.trusted_hosts]


class Guard:
    """Security headers on every response; request bodies bounded before any parsing: over max_body refused
    (413), at most max_uploads read or answered at once (more: 503 with Retry-After, nothing read), and each
    read within timeout_s of its start (408). `refuse(request, status, reason)` makes the answer. At most
    max_uploads x max_body bytes of bodies are held, however many clients send or stall."""

    def __init__(self, app, max_body: int, max_uploads: int, timeout_s: float, refuse):
        self.app, self.max_body, self.timeout_s, self.refuse = app, max_body, timeout_s, refuse
        self.uploads = threading.BoundedSemaphore(max_uploads)  # held while a body is read or answered

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_secured(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        async def answer(status: int, reason: str, **headers: str) -> None:
            response = self.refuse(Request(scope), status, reason)
            response.headers.update(headers)
            await response(scope, receive, send_secured)

        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send_secured)
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            return await self.drained(receive, deadline, answer)
        if not self.uploads.acquire(blocking=False):  # refused before any of it is read (uvicorn drops the rest)
            return await answer(503, "busy", **{"retry-after": str(RETRY_AFTER_S)})
        try:
            chunks, size, more = [], 0, True
            try:
                async with asyncio.timeout_at(deadline):
                    while more and size <= self.max_body:
                        message = await receive()
                        if message["type"] == "http.disconnect":
                            return
                        chunks.append(message.get("body", b""))
                        size += len(chunks[-1])
                        more = message.get("more_body", False)
            except TimeoutError:
                chunks.clear()
                return await answer(408, "upload-timeout", connection="close")
            if size > self.max_body:
                chunks.clear()
                return await self.drained(receive, deadline, answer)
            body, replayed = b"".join(chunks), False
            chunks.clear()  # one copy of the body, not two

            async def replay():
                nonlocal body, replayed
                if not replayed:
                    message, body, replayed = {"type": "http.request", "body": body, "more_body": False}, b"", True
                    return message  # the application's parser holds it from now on, not this middleware
                return await receive()

            await self.app(scope, replay, send_secured)
        finally:
            self.uploads.release()

    async def drained(self, receive, deadline: float, answer) -> None:
        """Read and drop what is left of a body over max_body (DRAIN_LIMIT at most, until the deadline), so that
        a browser that sends all of it before it reads sees the answer: 413."""
        try:
            async with asyncio.timeout_at(deadline):
                size, more = 0, True
                while more and size < DRAIN_LIMIT:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    size += len(message.get("body", b""))
                    more = message.get("more_body", False)
        except TimeoutError:
            return await answer(413, "too-large", connection="close")
        await answer(413, "too-large")
