"""Download: one web image's bytes, politely and safely, or the reason it could not be had.

Runs in Spark tasks, one Downloader per task shared by its threads: a pooled requests session,
an identifying User-Agent, per-request timeouts, retries with exponential backoff and full
jitter (honouring Retry-After), a per-host request rate, a byte limit, and a guard that refuses
addresses inside private networks unless allowed (every redirect is checked again).
"""

from __future__ import annotations

import email.utils
import ipaddress
import random
import socket
import threading
import time
from functools import lru_cache, partial
from urllib.parse import urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter

from cbir.images import ImageRejected, first_line
from cbir.settings import Crawl

RETRY_STATUSES = {429, 500, 502, 503, 504}


def refused_reason(host: str, port: int, allow_hosts: list[str]) -> str | None:
    """Why a host may not be fetched (it resolves to a non-public address), or None when it may."""
    if host.lower().rstrip(".") in {h.lower() for h in allow_hosts if "/" not in h}:
        return None
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except (socket.gaierror, UnicodeError) as exc:
        raise ImageRejected("dns", f"{host} does not resolve ({exc})") from None
    allowed = [ipaddress.ip_network(h, strict=False) for h in allow_hosts if "/" in h]
    for text in sorted(addresses):
        address = ipaddress.ip_address(text.split("%")[0])
        if text in allow_hosts or any(address in network for network in allowed):
            continue
        if not address.is_global or address.is_multicast:
            return f"{host} resolves to {address}, a private, loopback, link-local or reserved address"
    return None


class HostRate:
    """At most `per_s` request starts a second to each host (a pacing schedule, shared by threads)."""

    def __init__(self, per_s: float):
        self.interval = 1.0 / per_s
        self.next_start: dict[str, float] = {}
        self.lock = threading.Lock()

    def wait(self, host: str) -> None:
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_start.get(host, now))
            self.next_start[host] = start + self.interval
        if start > now:
            time.sleep(start - now)


class Downloader:
    def __init__(self, crawl: Crawl, max_bytes: int, parallel_tasks: int = 1):
        self.crawl, self.max_bytes = crawl, max_bytes
        self.rate = HostRate(crawl.per_host_per_s / max(parallel_tasks, 1))  # the limit is for all tasks together
        # One lookup per host and task, not per request (a task lasts seconds to minutes).
        self.refused = lru_cache(maxsize=4096)(partial(refused_reason, allow_hosts=crawl.allow_hosts))
        self.session = requests.Session()
        self.session.trust_env = False  # no proxies or .netrc from the environment: the guard checks the real host
        self.session.headers["User-Agent"] = crawl.user_agent
        adapter = HTTPAdapter(pool_connections=64, pool_maxsize=crawl.concurrency)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def fetch(self, url: str) -> bytes:
        """The bytes at url (at most max_bytes + 1 of them), following checked redirects."""
        for _ in range(self.crawl.max_redirects + 1):
            response = self._get(url)
            if response.is_redirect:
                location = response.headers.get("Location", "")
                response.close()
                url = urljoin(url, location)
                continue
            with response:
                if response.status_code != 200:
                    raise ImageRejected(f"http-{response.status_code}", f"{response.reason or 'error'} from {_host(url)}")
                return self._body(response, url)
        raise ImageRejected("too-many-redirects", f"more than crawl.max_redirects={self.crawl.max_redirects}")

    def _get(self, url: str) -> requests.Response:
        """One request with retries; the address is checked before each try."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ImageRejected("unsupported-uri", f"only http and https URLs are crawled, not {url[:100]!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        for attempt in range(self.crawl.retries + 1):
            reason = self.refused(parts.hostname, port)
            if reason:
                raise ImageRejected("refused-address", reason)
            self.rate.wait(parts.hostname)
            last = attempt == self.crawl.retries
            try:
                response = self.session.get(url, stream=True, allow_redirects=False, timeout=self.crawl.timeout_s)
            except requests.Timeout:
                if last:
                    raise ImageRejected("timeout", f"no answer from {parts.hostname} in {self.crawl.timeout_s} s") from None
                self._backoff(attempt)
                continue
            except requests.ConnectionError as exc:
                if last:
                    raise ImageRejected("connection", f"{parts.hostname}: {first_line(exc)}") from None
                self._backoff(attempt)
                continue
            if response.status_code not in RETRY_STATUSES or last:
                return response
            retry_after = _retry_after(response.headers.get("Retry-After"))
            response.close()
            self._backoff(attempt, retry_after)
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int, retry_after: float | None = None) -> None:
        wait = retry_after if retry_after is not None else random.uniform(0, self.crawl.backoff_s * 2**attempt)
        time.sleep(min(wait, self.crawl.max_wait_s))

    def _body(self, response: requests.Response, url: str) -> bytes:
        length = response.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.max_bytes:  # refused without reading it
            raise ImageRejected("too-large", f"{length} bytes is over ingest.max_bytes={self.max_bytes}")
        data = bytearray()
        try:
            for chunk in response.iter_content(64 * 1024):
                data += chunk
                if len(data) > self.max_bytes:
                    return bytes(data[: self.max_bytes + 1])
        except requests.RequestException as exc:
            reason = "timeout" if "timed out" in str(exc) else "truncated"
            raise ImageRejected(reason, f"{_host(url)} stopped sending: {first_line(exc)}") from None
        return bytes(data)


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

