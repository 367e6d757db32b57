"""Crawl throughput and memory: URL lists against a local image host that adds 50 ms to every
request and fails 1% of them (HTTP 500, retried as on the web).

The host runs in its own process and answers on every 127.x address, so the URLs spread over
100 host names and the default politeness (crawl.per_host_per_s=20 per host) applies as it
would on the web. Each image is a distinct small JPEG. Each crawl runs in a fresh process
(local Spark, local lake): a 200-URL warm-up crawl starts Spark's workers, timed apart, then
the timed crawl. Peak memory is the sum of that process tree's RSS (driver, JVM, Python
workers), sampled every 0.2 s. Baseline, in the same run: a plain loop that downloads, checks
and stores one URL at a time with requests.

    .venv/bin/python -m bench.crawl [--small 5000] [--large 50000]

Prints a table, then one JSON line: {"img_s", "peak_rss_mb_5k", "peak_rss_mb_50k", ...}.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import random
import subprocess
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

HOSTS = 100
LATENCY_S, FAILURE_RATE = 0.05, 0.01
WARM_UP, WARM_UP_FIRST = 200, 10_000_000


def jpegs(count: int = 64) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8).repeat(32, 0).repeat(32, 1)  # 256x256 blocks
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
        out.append(buffer.getvalue())
    return out


def serve(port_out) -> None:
    """The image host: /<n>.jpg is image n % 64 with n in a JPEG comment, so every URL's bytes differ."""
    images = jpegs()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real image hosts do

        def log_message(self, *args):
            pass

        def do_GET(self):
            time.sleep(LATENCY_S)
            n = int(self.path.strip("/").split(".")[0])
            if random.random() < FAILURE_RATE:
                body, status = b"try again", 500
            else:
                comment = f"image {n}".encode()
                body, status = (
                    images[n % 64][:2]
                    + b"\xff\xfe"
                    + (len(comment) + 2).to_bytes(2, "big")
                    + comment
                    + images[n % 64][2:],
                    200,
                )
            self.send_response(status)
            self.send_header("Content-Type", "image/jpeg" if status == 200 else "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    class Server(ThreadingHTTPServer):
        daemon_threads, request_queue_size = True, 1024

        def handle_error(self, request, client_address):
            pass  # clients close idle keep-alive connections

    server = Server(("0.0.0.0", 0), Handler)
    port_out.put(server.server_address[1])
    server.serve_forever()


def url(port: int, n: int) -> str:
    return f"http://127.0.0.{1 + n % HOSTS}:{port}/{n}.jpg"


def tree_rss_mb(root: int) -> dict[str, float]:
    """The RSS of a process and all its descendants, by part: driver, JVM, Python workers."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parent = int(handle.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry))
            except OSError:
                continue
    parts = {"driver": 0.0, "jvm": 0.0, "workers": 0.0}
    stack = [root]
    while stack:
        pid = stack.pop()
        stack += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/status") as handle:
                status = handle.read()
        except OSError:
            continue
        rss = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        name = status.split("\n", 1)[0].split()[-1]
        part = "driver" if pid == root else "jvm" if name == "java" else "workers"
        parts[part] += rss / 1024
    return parts


def crawl_once(port: int, count: int, overrides: list[str]) -> dict:
    """One crawl of `count` URLs in a fresh process; its summary and its tree's peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "urls.txt"
        listing.write_text("".join(url(port, n) + "\n" for n in range(count)))
        child = subprocess.Popen(
            [sys.executable, __file__, "--child", str(listing), tmp, str(port), *overrides],
            stdout=subprocess.PIPE,
            text=True,
        )
        peak = {"total": 0.0}
        while child.poll() is None:
            parts = tree_rss_mb(child.pid)
            if sum(parts.values()) > peak["total"]:
                peak = {"total": sum(parts.values()), **parts}
            time.sleep(0.2)
        result = json.loads(child.stdout.read().strip().splitlines()[-1])
        return {**result, "peak_rss_mb": round(peak["total"]), "peak_parts": {k: round(v) for k, v in peak.items()}}


def child(listing: str, tmp: str, port: str, *overrides: str) -> None:
    from cbir.settings import load_settings
    from jobs.spark import build_session

    settings = load_settings(
        overrides=[f"lake={tmp}/lake", f"state_dir={tmp}/state", "crawl.allow_hosts=127.0.0.0/8", *overrides],
        environ={},
    )
    spark = build_session(settings)
    warm_up = Path(tmp) / "warm-up.txt"  # starts the JVM's and Python workers' first jobs, timed apart
    warm_up.write_text("".join(url(int(port), WARM_UP_FIRST + n) + "\n" for n in range(WARM_UP)))
    cold = crawl(spark, settings, str(warm_up))
    summary = crawl(spark, settings, listing)
    print(
        json.dumps(
            {
                "downloaded": summary.ingested,
                "failed": summary.failed,
                "seconds": summary.seconds,
                "img_s": summary.images_per_s,
                "warm_up_s": cold.seconds,
            }
        )
    )


def crawl(spark, settings, listing: str):
    from cbir.lake import Lake
    from cbir.reader import Listing, read_web_entries, resolve_url_list
    from jobs import ingest
    from jobs.job import run as run_job

    source = resolve_url_list(listing, settings)
    return run_job(
        ingest.IngestJob(Lake.open(settings), settings, Listing(source.uri, read_web_entries(source))), spark
    )


def baseline(port: int, count: int) -> float:
    """One URL at a time: requests.get, the same checks, the same content-addressed store."""
    import requests

    from cbir.images import Limits, inspect_image
    from cbir.lake import Lake
    from cbir.settings import load_settings

    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(overrides=[f"lake={tmp}/lake"], environ={})
        lake, limits, session = Lake.open(settings), Limits.from_settings(settings.ingest), requests.Session()
        started = time.perf_counter()
        for n in range(count):
            response = session.get(url(port, n), timeout=10)
            if response.status_code == 200:
                info = inspect_image(response.content, limits)
                lake.put_image(info.image_id, info.format, response.content)
        return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=5000)
    parser.add_argument("--large", type=int, default=50000)
    parser.add_argument("--baseline", type=int, default=300, help="URLs for the one-at-a-time baseline")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a cbir setting for the crawls")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)

    port_out = multiprocessing.Queue()
    host = multiprocessing.Process(target=serve, args=(port_out,), daemon=True)
    host.start()
    port = port_out.get(timeout=30)
    try:
        base = baseline(port, args.baseline)
        small = crawl_once(port, args.small, args.set)
        large = crawl_once(port, args.large, args.set)
    finally:
        host.terminate()

    print(f"image host: {LATENCY_S * 1000:.0f} ms a request, {FAILURE_RATE:.0%} fail (500), {HOSTS} host names")
    print(
        f"each crawl process first crawls {WARM_UP} other URLs to start Spark's workers: "
        f"{small['warm_up_s']:.1f} s and {large['warm_up_s']:.1f} s, not counted below"
    )
    print(f"{'run':<42}{'images/s':>10}{'peak RSS MB':>13}{'failed':>8}")
    print(f"{f'baseline: one at a time ({args.baseline} URLs)':<42}{base:>10.1f}{'':>13}{'':>8}")
    for name, run in ((f"cbir crawl, {args.small:,} URLs", small), (f"cbir crawl, {args.large:,} URLs", large)):
        print(f"{name:<42}{run['img_s']:>10.1f}{run['peak_rss_mb']:>13}{sum(run['failed'].values()):>8}")
        print(
            f"{'  at the peak, MB':<42}" + ", ".join(f"{k} {v}" for k, v in run["peak_parts"].items() if k != "total")
        )
    print(
        f"speedup over the baseline ({args.small:,} URLs): {small['img_s'] / base:.1f}x; "
        f"memory {large['peak_rss_mb'] / small['peak_rss_mb']:.2f}x for {args.large // args.small}x the URLs"
    )
    print(
        json.dumps(
            {
                "img_s": round(small["img_s"], 1),
                "peak_rss_mb_5k": small["peak_rss_mb"],
                "peak_rss_mb_50k": large["peak_rss_mb"],
                "img_s_50k": round(large["img_s"], 1),
                "baseline_img_s": round(base, 1),
                "warm_up_s": round(small["warm_up_s"], 1),
                "failed_5k": small["failed"],
                "failed_50k": large["failed"],
            }
        )
    )


if __name__ == "__main__":
    main()
