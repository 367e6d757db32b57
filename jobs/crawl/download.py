"""Download: one web image's bytes, politely and safely, or the reason it could not be had.

Runs in Spark tasks, one Downloader per task shared by its threads: a pooled requests session,
an identifying User-Agent, per-request timeouts and one deadline per URL, retries with
exponential backoff and full jitter (honouring Retry-After), a per-host request rate, a byte
limit, X-Robots-Tag opt-outs, and a guard that refuses addresses inside private networks unless
allowed. Each name is resolved once and the checked address is the one dialled (no DNS
rebinding); every redirect is checked again.
"""

from __future__ import annotations

import email.utils
import ipaddress
import random
import re
import socket
import threading
import time
from collections.abc import Callable
from functools import lru_cache
from urllib.parse import urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

from cbir.images import ImageRejected, first_line
from cbir.settings import Crawl
from jobs.crawl.pacing import Pacer

RETRY_STATUSES = {429, 500, 502, 503, 504}
# Public-looking IPv6 ranges that reach IPv4 hosts (NAT64, local-use NAT64, 6to4, IPv4-compatible, SIIT's
# IPv4-translated): a gateway may forward them to private addresses, so they are refused unless allow-listed.
TRANSLATED = [
    ipaddress.ip_network(n) for n in ("64:ff9b::/96", "64:ff9b:1::/48", "2002::/16", "::/96", "::ffff:0:0:0/96")
]
# Ranges whose low 32 bits are an IPv4 address: IPv4-mapped, SIIT, NAT64's well-known prefix, IPv4-compatible.
LOW_32_BITS = [ipaddress.ip_network(n) for n in ("::ffff:0:0/96", "::ffff:0:0:0/96", "64:ff9b::/96", "::/96")]
SITE_LOCAL = ipaddress.ip_network("fec0::/10")  # deprecated, but still routed inside some networks
# What no URL we dial may hold: requests/urllib3 end the host at a backslash, other parsers do not.
UNSAFE_URL = re.compile(r"[\\\s\x00-\x1f\x7f]")

Resolver = Callable[..., list]


def target(url: str) -> tuple[str, int]:
    """The (host, port) that will be dialled for url; refused unless both URL parsers agree on it."""
    if UNSAFE_URL.search(url):
        raise ImageRejected("bad-url", f"backslashes, whitespace and control characters are refused: {url[:100]!r}")
    try:
        dialled, parts = parse_url(url), urlsplit(url)
        port = parts.port
    except (LocationParseError, ValueError):
        raise ImageRejected("bad-url", f"not a valid URL: {url[:100]!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ImageRejected("unsupported-uri", f"only http and https URLs are crawled, not {url[:100]!r}")
    host = (dialled.host or "").strip("[]").lower()
    if dialled.scheme != parts.scheme or host != parts.hostname or dialled.port != port:
        raise ImageRejected("bad-url", f"ambiguous host (is it {host!r} or {parts.hostname!r}?): {url[:100]!r}")
    return host, port or (443 if parts.scheme == "https" else 80)


def checked_address(host: str, port: int, allow_hosts: list[str], resolve: Resolver | None = None) -> str:
    """The address to dial for host (resolved once here), or ImageRejected when any of its addresses is
    private, loopback, link-local, site-local, reserved, multicast or an IPv4 translation, unless allowed."""
    try:
        answers = (resolve or socket.getaddrinfo)(host, port, type=socket.SOCK_STREAM)
        addresses = sorted({info[4][0] for info in answers})
    except (socket.gaierror, UnicodeError) as exc:
        raise ImageRejected("dns", f"{host} does not resolve ({exc})") from None
    if not addresses:
        raise ImageRejected("dns", f"{host} has no address")
    if host.rstrip(".") in {h.lower().rstrip(".") for h in allow_hosts if "/" not in h}:
        return addresses[0]
    allowed = [ipaddress.ip_network(h, strict=False) for h in allow_hosts if "/" in h]
    for text in addresses:
        address = ipaddress.ip_address(text.split("%")[0])
        if text in allow_hosts or any(address.version == n.version and address in n for n in allowed):
            continue
        if not _public(address):
            return _refuse(host, address)
    return addresses[0]


def _public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Global and unicast; for IPv6 also not site-local, not an IPv4 translation, and no embedded IPv4
    address (mapped, SIIT, NAT64, 6to4, Teredo's server and client) that is not public itself."""
    if not address.is_global or address.is_multicast:
        return False
    if address.version == 4:
        return True
    if address in SITE_LOCAL or any(address in network for network in TRANSLATED):
        return False
    return all(_public(embedded) for embedded in embedded_ipv4(address))


def embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (and a gateway may forward to), if any."""
    embedded = []
    if any(address in network for network in LOW_32_BITS):
        embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    if address.sixtofour:
        embedded.append(address.sixtofour)
    if address.teredo:
        embedded.extend(address.teredo)
    return embedded


def _refuse(host: str, address) -> str:
    raise ImageRejected(
        "refused-address",
        f"{host} resolves to {address}, a private, loopback, link-local, reserved or IPv4-translating address",
    )


def refused_reason(host: str, port: int, allow_hosts: list[str], resolve: Resolver | None = None) -> str | None:
    """Why a host may not be fetched, or None when it may."""
    try:
        checked_address(host, port, allow_hosts, resolve)
    except ImageRejected as exc:
        if exc.reason == "refused-address":
            return str(exc).partition(": ")[2]
        raise
    return None


class PinnedAdapter(HTTPAdapter):
    """Connections dial the address the guard checked, not a second DNS answer; the name is kept for
    the Host header, TLS SNI and certificate checks."""

    def __init__(self, address: Callable[[str, int], str], in_use: threading.local, **kwargs):
        self.address, self.in_use = address, in_use
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _pinned_pool(HTTPConnectionPool, HTTPConnection, self.address, self.in_use),
            "https": _pinned_pool(HTTPSConnectionPool, HTTPSConnection, self.address, self.in_use),
        }


def _pinned_pool(pool: type, connection: type, address: Callable[[str, int], str], in_use: threading.local) -> type:
    def _new_conn(self):
        name = self._dns_host
        # Only the socket uses _dns_host; the Host header, SNI and certificate check read it after.
        self._dns_host = address(name.rstrip(".").lower(), self.port)
        try:
            return connection._new_conn(self)
        finally:
            self._dns_host = name

    def request(self, *args, **kwargs):
        connections = getattr(in_use, "connections", None)
        if connections is not None:
            connections.append(self)  # so the fetch's deadline can cut it
        return connection.request(self, *args, **kwargs)

    pinned = type(f"Pinned{connection.__name__}", (connection,), {"_new_conn": _new_conn, "request": request})
    return type(f"Pinned{pool.__name__}", (pool,), {"ConnectionCls": pinned})


# Google's X-Robots-Tag directives that take a value after a colon (unavailable_after's, a date, has colons too).
VALUED_DIRECTIVES = {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}
AGENT_NAME = re.compile(r"[a-z0-9_.*-]+")


def opted_out(headers, tokens: list[str], agent: str = "cbir") -> str | None:
    """The X-Robots-Tag value that asks crawlers like cbir to keep out, or None."""
    wanted = {t.lower() for t in tokens}
    for value in headers.getlist("X-Robots-Tag") if hasattr(headers, "getlist") else [headers.get("X-Robots-Tag", "")]:
        if wanted & robots_directives(value, agent):
            return value.strip()
    return None


def robots_directives(value: str, agent: str = "cbir") -> set[str]:
    """The directive names (lowercase, values dropped) of one X-Robots-Tag value that apply to agent.

    Google's grammar: directives separated by commas, the list led by an optional user agent
    ("otherbot: noindex, nofollow"), which makes them that agent's only; `NAME: value` is a directive
    when NAME takes a value ("unavailable_after: 25 Jun 2030 15:00:00 PST"), a user agent otherwise
    (a later one starts that agent's list, as when a proxy joins several headers with commas).
    `none` means noindex, nofollow."""
    found: set[str] = set()
    applies = True  # directives before any user agent are every crawler's
    for item in value.split(","):
        name, colon, rest = item.partition(":")
        name = name.strip().lower()
        if colon and name not in VALUED_DIRECTIVES and AGENT_NAME.fullmatch(name):
            applies = name in ("*", agent.lower())
            name = rest.partition(":")[0].strip().lower()
        if applies and name:
            found |= {name, "noindex", "nofollow"} if name == "none" else {name}
    return found


class Downloader:
    def __init__(self, crawl: Crawl, max_bytes: int, parallel_tasks: int = 1, resolve: Resolver | None = None):
        self.crawl, self.max_bytes = crawl, max_bytes
        self.rate = Pacer(crawl.per_host_per_s / max(parallel_tasks, 1))  # the limit is for all tasks together
        # One lookup per host and task, not per request (a task lasts seconds to minutes); the
        # connections dial this same checked answer.
        self.address = lru_cache(maxsize=4096)(
            lambda host, port: checked_address(host, port, crawl.allow_hosts, resolve)
        )
        self.session = requests.Session()
        self.session.trust_env = False  # no proxies or .netrc from the environment: the guard checks the real host
        self.session.headers["User-Agent"] = crawl.agent
        self.in_use = threading.local()  # per thread: the connections of its request in flight
        adapter = PinnedAdapter(self.address, self.in_use, pool_connections=64, pool_maxsize=crawl.concurrency)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def fetch(self, url: str) -> bytes:
        """The bytes at url (at most max_bytes + 1 of them), following checked redirects, all within
        crawl.deadline_s: hops, retries and the body together."""
        deadline = time.monotonic() + self.crawl.deadline_s
        for _ in range(self.crawl.max_redirects + 1):
            response = self._get(url, deadline)
            if response.is_redirect:
                location = response.headers.get("Location", "")
                response.close()
                url = urljoin(url, location)
                continue
            with response:
                if response.status_code != 200:
                    raise ImageRejected(
                        f"http-{response.status_code}", f"{response.reason or 'error'} from {_host(url)}"
                    )
                if self.crawl.opt_out_tokens and (said := opted_out(response.raw.headers, self.crawl.opt_out_tokens)):
                    raise ImageRejected("opted-out", f"{_host(url)} says X-Robots-Tag: {said[:100]}")
                return self._body(response, url, deadline)
        raise ImageRejected("too-many-redirects", f"more than crawl.max_redirects={self.crawl.max_redirects}")

    def _get(self, url: str, deadline: float) -> requests.Response:
        """One request with retries; the address is checked before each try."""
        host, port = target(url)
        for attempt in range(self.crawl.retries + 1):
            self.address(host, port)  # a refused host is never waited for nor contacted
            self.rate.wait(host)
            last = attempt == self.crawl.retries
            try:
                response = self._request(url, deadline, host)
            except requests.Timeout:
                self._left(deadline, host)
                if last:
                    raise ImageRejected("timeout", f"no answer from {host} in {self.crawl.timeout_s} s") from None
                self._backoff(attempt, deadline, host)
                continue
            except requests.ConnectionError as exc:
                self._left(deadline, host)
                if last:
                    raise ImageRejected("connection", f"{host}: {first_line(exc)}") from None
                self._backoff(attempt, deadline, host)
                continue
            if response.status_code not in RETRY_STATUSES or last:
                return response
            retry_after = _retry_after(response.headers.get("Retry-After"))
            response.close()
            self._backoff(attempt, deadline, host, retry_after)
        raise AssertionError("unreachable")

    def _request(self, url: str, deadline: float, host: str) -> requests.Response:
        """One GET to the response headers. Per-read timeouts alone would let a host trickle its headers
        for hours; at the deadline the connection is shut down under the waiting read."""
        left = self._left(deadline, host)
        connections = self.in_use.connections = []
        timer = threading.Timer(left, _shut_down, (connections,))
        timer.daemon = True
        timer.start()
        try:
            return self.session.get(url, stream=True, allow_redirects=False, timeout=min(self.crawl.timeout_s, left))
        finally:
            timer.cancel()
            self.in_use.connections = None

    def _left(self, deadline: float, host: str) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ImageRejected("timeout", f"{host} took over crawl.deadline_s={self.crawl.deadline_s:g} s")
        return left

    def _backoff(self, attempt: int, deadline: float, host: str, retry_after: float | None = None) -> None:
        wait = retry_after if retry_after is not None else random.uniform(0, self.crawl.backoff_s * 2**attempt)
        wait = min(wait, self.crawl.max_wait_s)
        if wait >= self._left(deadline, host):  # no point waiting past the deadline
            raise ImageRejected(
                "timeout", f"{host} asks to wait {wait:.0f} s, past crawl.deadline_s={self.crawl.deadline_s:g}"
            )
        time.sleep(wait)

    def _body(self, response: requests.Response, url: str, deadline: float) -> bytes:
        length = response.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.max_bytes:  # refused without reading it
            raise ImageRejected("too-large", f"{length} bytes is over ingest.max_bytes={self.max_bytes}")
        data = bytearray()
        connection = response.raw.connection
        try:
            # read1 returns what one read brings, and each read may wait only what is left of the
            # deadline: a host trickling a byte at a time cannot hold the thread past it.
            while len(data) <= self.max_bytes:
                left = min(self.crawl.timeout_s, self._left(deadline, _host(url)))
                if connection is not None and connection.sock is not None:
                    connection.sock.settimeout(left)
                chunk = response.raw.read1(64 * 1024, decode_content=True)
                if not chunk:
                    break
                data += chunk
        except (requests.RequestException, OSError, Urllib3Error) as exc:
            if time.monotonic() >= deadline:
                raise ImageRejected(
                    "timeout", f"{_host(url)} took over crawl.deadline_s={self.crawl.deadline_s:g} s"
                ) from None
            reason = "timeout" if "timed out" in str(exc) else "truncated"
            raise ImageRejected(reason, f"{_host(url)} stopped sending: {first_line(exc)}") from None
        return bytes(data[: self.max_bytes + 1])


def _shut_down(connections: list) -> None:
    for connection in connections:
        try:
            if connection.sock is not None:
                connection.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds: a number of seconds or an HTTP date."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _host(url: str) -> str:
    return urlsplit(url).hostname or url[:100]
