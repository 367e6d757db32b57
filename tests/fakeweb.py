"""A fake Flickr REST API and a misbehaving image host, on 127.0.0.1, for the crawl tests.

The Flickr side answers flickr.photos.search as Flickr does (JSON, paging, extras, error codes,
HTTP 429) and checks the OAuth consumer key that the real flickrapi client sends.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from conftest import image_bytes

GOOD_KEY, GOOD_SECRET = "fake-flickr-key-0123456789", "fake-flickr-secret-abcdef"


class FakeWeb(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, photos: int = 7, host: str = "127.0.0.1", port: int = 0):
        super().__init__((host, port), Handler)
        self.base = f"http://{host}:{self.server_address[1]}"
        self.hits: Counter = Counter()
        self.searches: list[dict] = []
        self.user_agents: set[str] = set()
        self.rate_limited_pages: set[int] = set()  # answer HTTP 429 once for these pages
        self.photos = [self._photo(i) for i in range(photos)]
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def handle_error(self, request, client_address):
        pass  # a client that stops reading (the byte limit) is expected here

    def _photo(self, i: int) -> dict:
        photo = {
            "id": str(9000 + i),
            "owner": f"owner{i}@N0{i}",
            "ownername": f"Owner <b>{i}</b>",
            "title": f"A <script>photo</script> number {i}",
            "tags": f"dog park{i}",
            "license": i % 3,
            "datetaken": f"2020-0{1 + i % 9}-01 10:00:00",
            "url_z": f"{self.base}/img/{100 + i}.jpg?size=z",
        }
        if i % 2 == 0:
            photo["url_b"] = f"{self.base}/img/{100 + i}.jpg?size=b"
        if i == 3:
            del photo["url_z"]  # no size the crawl asks for
        return photo


class Handler(BaseHTTPRequestHandler):
    server: FakeWeb

    def log_message(self, *args):
        pass

    def do_POST(self):
        length = int(self.headers.get("Content-Length", 0))
        params = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
        key = re.search(r'oauth_consumer_key="([^"]*)"', self.headers.get("Authorization", ""))
        with self.server.lock:
            self.server.searches.append(params)
            page = int(params.get("page", 1))
            if page in self.server.rate_limited_pages:
                self.server.rate_limited_pages.discard(page)
                return self._send(429, b"Too Many Requests", "text/plain")
        if not key or key.group(1) != GOOD_KEY:
            return self._json({"stat": "fail", "code": 100, "message": "Invalid API Key (Key has invalid format)"})
        if params.get("method") != "flickr.photos.search":
            return self._json({"stat": "fail", "code": 112, "message": f'Method "{params.get("method")}" not found'})
        if params.get("sort", "relevance") not in ("relevance", "date-posted-desc"):
            return self._json({"stat": "fail", "code": 3, "message": "Unknown sort order"})
        per_page = int(params.get("per_page", 100))
        wanted = {e.removeprefix("url_") for e in params.get("extras", "").split(",") if e.startswith("url_")}
        photos = [
            {k: v for k, v in p.items() if not k.startswith("url_") or k[4:] in wanted}
            for p in self.server.photos[(page - 1) * per_page : page * per_page]
        ]
        total = len(self.server.photos)
        self._json(
            {
                "photos": {
                    "page": page,
                    "pages": -(-total // per_page),
                    "perpage": per_page,
                    "total": total,
                    "photo": photos,
                },
                "stat": "ok",
            }
        )

    def do_GET(self):
        path = urlsplit(self.path).path
        with self.server.lock:
            self.server.hits[path] += 1
            hits = self.server.hits[path]
        if match := re.fullmatch(r"/img/(\d+)\.(jpg|png)", path):
            fmt = "PNG" if match.group(2) == "png" else "JPEG"
            return self._send(200, image_bytes(int(match.group(1)), size=(64, 48), fmt=fmt), f"image/{fmt.lower()}")
        if match := re.fullmatch(r"/pause/(\d+)\.jpg", path):  # a download that takes a while
            time.sleep(0.2)
            return self._send(200, image_bytes(int(match.group(1)), size=(64, 48)), "image/jpeg")
        if path == "/big.jpg":
            return self._send(200, image_bytes(1, size=(800, 600), fmt="PNG", noise=True), "image/png")
        if path == "/large.jpg":  # within the byte limit, larger than crawl.resize
            return self._send(200, image_bytes(2, size=(400, 300)), "image/jpeg")
        if path == "/endless.jpg":  # no Content-Length, more bytes than allowed
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            for _ in range(64):
                self.wfile.write(b"\xff" * 65536)
            return
        if path == "/slow.jpg":
            time.sleep(2.5)
            return self._send(200, image_bytes(3), "image/jpeg")
        if path == "/flaky.jpg" and hits == 1:
            return self._send(503, b"busy", "text/plain")
        if path == "/limited.jpg" and hits == 1:
            return self._send(429, b"slow down", "text/plain", {"Retry-After": "1"})
        if path in ("/flaky.jpg", "/limited.jpg"):
            return self._send(200, image_bytes(4 if path == "/flaky.jpg" else 5), "image/jpeg")
        if path == "/broken.jpg":
            return self._send(500, b"oops", "text/plain")
        if path == "/moved.jpg":
            return self._send(302, b"", "text/plain", {"Location": "/img/100.jpg"})
        if path == "/to-private.jpg":
            return self._send(302, b"", "text/plain", {"Location": "http://10.255.255.1/secret.jpg"})
        if path == "/loop.jpg":
            return self._send(302, b"", "text/plain", {"Location": "/loop.jpg"})
        if path == "/trickle.jpg":  # a byte a while, each within crawl.timeout_s, for as long as the client stays
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            for _ in range(200):
                self.wfile.write(b"\xff")
                self.wfile.flush()
                time.sleep(0.2)
            return
        if path == "/trickle-headers.jpg":  # a header byte a while, each within crawl.timeout_s
            self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            for _ in range(200):
                self.wfile.write(b"a")
                self.wfile.flush()
                time.sleep(0.2)
            return
        if path == "/always-busy.jpg":
            return self._send(503, b"busy", "text/plain", {"Retry-After": "1"})
        if path == "/busy-hop.jpg":  # every hop busy once, then a redirect to the next hop
            return (
                self._send(503, b"busy", "text/plain", {"Retry-After": "1"})
                if hits % 2
                else self._send(302, b"", "text/plain", {"Location": "/busy-hop.jpg"})
            )
        if path.startswith("/robots/"):  # X-Robots-Tag values, one header each, from the query
            values = parse_qs(urlsplit(self.path).query).get("tag", [])
            return self._send(200, image_bytes(6), "image/jpeg", [("X-Robots-Tag", v) for v in values])
        if path == "/to-backslash.jpg":
            host = f"127.0.0.1:{self.server.server_address[1]}"
            return self._send(302, b"", "text/plain", {"Location": f"http://{host}\\@example.com/img/8.jpg"})
        if path == "/page.html":
            return self._send(200, b"<html><body>not an image</body></html>", "text/html")
        self._send(404, b"not found", "text/plain")

    def _json(self, data: dict):
        self._send(200, json.dumps(data).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str, headers: dict | list | None = None):
        self.server.user_agents.add(self.headers.get("User-Agent", ""))  # before the client can have its answer
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items() if isinstance(headers, dict) else headers or []:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)
