"""The application's guards: security headers on every response, uploads over the limit refused before
any parsing, and only the Host names this server is known by."""

from __future__ import annotations

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request

from cbir.settings import Settings

FORM_OVERHEAD = 64 * 1024  # multipart headers and the other fields, besides the image itself
DRAIN_LIMIT = 256 * 2**20  # read (and drop) at most this much of a refused upload, so the browser sees the answer
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
