"""Ingest throughput: 2,000 generated JPEGs into a local lake and into a moto S3 lake.

Baseline, in the same run: a plain single-process loop doing the same work per image
(read, full decode and checks, sha256, content-addressed write) with no Spark. The moto
server runs in its own process, as a real endpoint would. A small warm-up ingest starts
Spark's Python workers first, so the timed runs measure throughput, not start-up (both shown).

    .venv/bin/python -m bench.ingest [--images N]

Prints a table, then one JSON line: {"local_img_s", "s3_img_s", "baseline_local_img_s", "baseline_s3_img_s", ...}.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import numpy as np
from PIL import Image

from cbir.images import Limits, inspect_image
from cbir.lake import Lake
from cbir.settings import load_settings


def make_jpegs(folder: Path, count: int, first: int = 0) -> int:
    """Noise over gradients, 256x192, about 15 kB each, every one distinct."""
    rng = np.random.default_rng(first)
    y, x = np.mgrid[0:192, 0:256]
    total = 0
    folder.mkdir(parents=True)
    for i in range(first, first + count):
        base = np.stack([x + i, y * 2, (x + y + 3 * i)], -1) % 256
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="JPEG", quality=85)
        (folder / f"{i:05d}.jpg").write_bytes(out.getvalue())
        total += len(out.getvalue())
    return total


def baseline(folder: Path, settings) -> float:
    lake, limits = Lake.open(settings), Limits.from_settings(settings.ingest)
    started = time.perf_counter()
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        info = inspect_image(data, limits)
        lake.put_image(info.image_id, info.format, data)
    return time.perf_counter() - started


def cbir_ingest(spark, folder: Path, settings) -> tuple[float, int]:
    from cbir.reader import resolve_source
    from jobs import ingest
    from jobs.job import run as run_job

    lake = Lake.open(settings)
    lake.check()
    summary = run_job(ingest.IngestJob(lake, settings, resolve_source(str(folder), settings)), spark)
    return summary.seconds, summary.ingested


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
            return server, endpoint
        except Exception:  # noqa: BLE001 - the server is still starting
            time.sleep(0.2)
    raise RuntimeError("moto server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args()
    from jobs.spark import build_session

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "jpegs"
        size = make_jpegs(folder, args.images)
        make_jpegs(tmp / "warmup", 16, first=10**6)
        server, endpoint = start_moto()

        def settings(lake: str, *extra: str):
            return load_settings(overrides=[f"lake={lake}", f"state_dir={tmp}/state", *extra], environ={})

        local = settings(f"{tmp}/lake-local")
        s3 = settings("s3://bench/lake", f"s3.endpoint_url={endpoint}", "s3.region=us-east-1")
        base_s = baseline(folder, settings(f"{tmp}/lake-baseline"))
        base_s3_s = baseline(
            folder, settings("s3://bench/baseline", f"s3.endpoint_url={endpoint}", "s3.region=us-east-1")
        )
        started = time.perf_counter()
        spark = build_session(local)
        session_s = time.perf_counter() - started
        warmup_s, _ = cbir_ingest(spark, tmp / "warmup", settings(f"{tmp}/lake-warmup"))
        local_s, local_n = cbir_ingest(spark, folder, local)
        s3_s, s3_n = cbir_ingest(spark, folder, s3)
        spark.stop()
        server.terminate()

    n = args.images
    results = {
        "images": n,
        "mean_kb": round(size / n / 1024, 1),
        "cores": os.cpu_count(),
        "baseline_local_img_s": round(n / base_s, 1),
        "baseline_s3_img_s": round(n / base_s3_s, 1),
        "local_img_s": round(local_n / local_s, 1),
        "s3_img_s": round(s3_n / s3_s, 1),
        "spark_session_s": round(session_s, 1),
        "warmup_s": round(warmup_s, 1),
    }
    print(f"{'run':<34}{'images':>8}{'seconds':>10}{'images/s':>10}")
    for name, seconds, count in (
        ("baseline: one process -> local", base_s, n),
        ("cbir ingest -> local lake", local_s, local_n),
        ("baseline: one process -> moto S3", base_s3_s, n),
        ("cbir ingest -> moto S3 lake", s3_s, s3_n),
    ):
        print(f"{name:<34}{count:>8}{seconds:>10.1f}{count / seconds:>10.1f}")
    print(
        f"not counted: Spark session start {session_s:.1f} s, warm-up ingest of 16 images {warmup_s:.1f} s; "
        f"{n} JPEGs of {results['mean_kb']} kB mean; {results['cores']} cores"
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
