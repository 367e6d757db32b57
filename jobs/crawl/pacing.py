"""One rate limiter for every call cbir makes to the web: Flickr API calls and image downloads."""

from __future__ import annotations

import threading
import time


class Pacer:
    """At most `per_s` starts a second per key (a host; one key by default): an even schedule, not bursts,
    shared by the threads that hold it."""

    def __init__(self, per_s: float):
        self.interval = 1.0 / per_s
        self.next_start: dict[str, float] = {}
        self.lock = threading.Lock()

    def wait(self, key: str = "") -> None:
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_start.get(key, now))
            self.next_start[key] = start + self.interval
        if start > now:
            time.sleep(start - now)
