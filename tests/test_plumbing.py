"""Small shared pieces: the per-task stats record, the one rate limiter, URIs."""

from __future__ import annotations

import time
from collections import Counter

from cbir import uris
from cbir.stats import TaskStats
from jobs.crawl.pacing import Pacer


def test_task_stats_travel_as_json_and_sum():
    one = TaskStats(
        status=Counter(ok=2), failed=Counter({"not-found": 1}), seconds=Counter(write=0.5), counts=Counter(bytes=10)
    )
    two = TaskStats.from_json(one.to_json())
    assert two == one
    two += TaskStats(failed=Counter({"not-found": 1, "too-large": 1}), seconds=Counter(read=1.0))
    assert (two.status, two.failed, two.seconds, two.counts) == (
        {"ok": 2},
        {"not-found": 2, "too-large": 1},
        {"write": 0.5, "read": 1.0},
        {"bytes": 10},
    )


def test_the_pacer_spaces_starts_evenly_per_key():
    pacer = Pacer(per_s=20)  # one start every 50 ms per key
    started = time.monotonic()
    for _ in range(4):
        pacer.wait("a")
    pacer.wait("b")  # another host: not held up by the first
    assert 0.14 <= time.monotonic() - started < 0.5


def test_uris():
    assert [uris.scheme(u) for u in ("s3://b/k", "file:///x", "/x", "gs://b")] == ["s3", "file", None, "gs"]
    assert uris.link("s3://b/g.html") == "s3://b/g.html" and uris.link("/l/g.html") == "file:///l/g.html"
