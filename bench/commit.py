"""Delta commit: one run of 1,000 Parquet parts committed as one Delta transaction, on a moto S3 lake and a
local one. Parts are written first (as Spark tasks would, in parallel, not timed); the commit is timed: the
add actions with statistics, the conditional PUT of the log entry, the clean-up of the run's folder. Also
timed: the same commit when another run committed half of the same keys in between (the rewrite path).
Target (issue 17): under 10 s on moto S3. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa

from bench.ingest import start_moto
from cbir.lake import Lake, new_run_id
from cbir.schemas import MANIFEST
from cbir.settings import load_settings


def rows(run_id: str, start: int, n: int) -> pa.RecordBatch:
    data = {name: [None] * n for name in MANIFEST.names}
    data.update(
        uri=[f"/img/{start + i}.jpg" for i in range(n)],
        image_id=[f"{start + i:064x}" for i in range(n)],
        status=["ok"] * n,
        run_id=[run_id] * n,
        ingested_at=[datetime.now(UTC)] * n,
    )
    return pa.RecordBatch.from_pydict(data, schema=MANIFEST)


def write_parts(table, run_id: str, parts: int, per_part: int, offset: int = 0) -> list:
    def one(i: int):
        writer = table.part_writer(run_id, f"{i:05d}-")
        writer.write(rows(run_id, offset + i * per_part, per_part))
        return writer.close()

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(one, range(parts)))


def measure(settings, parts: int, per_part: int) -> dict:
    lake = Lake.open(settings)
    lake.check()
    table = lake.table("manifest")
    table.read()  # pins the version the run reads
    run_id = new_run_id()
    written = write_parts(table, run_id, parts, per_part)
    started = time.perf_counter()
    record = table.commit(run_id, written, job="bench")
    plain = time.perf_counter() - started
    assert record["rows"] == parts * per_part and lake.table("manifest").read().num_rows == parts * per_part

    # Two runs read the same version; the other commits the upper half of this one's keys first.
    mine, other = lake.table("manifest"), lake.table("manifest")
    mine.read(), other.read()
    a, b = new_run_id(), new_run_id()
    base = parts * per_part
    parts_a = write_parts(mine, a, parts, per_part, base)
    parts_b = write_parts(other, b, parts // 2, per_part, base + parts * per_part // 2)
    other.commit(b, parts_b, job="bench")
    started = time.perf_counter()
    record = mine.commit(a, parts_a, job="bench")
    conflicted = time.perf_counter() - started
    assert record["rows"] == parts * per_part // 2 and lake.table("manifest").read().num_rows == 2 * base
    return {"commit_s": round(plain, 2), "commit_after_conflict_s": round(conflicted, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", type=int, default=1000)
    parser.add_argument("--rows-per-part", type=int, default=20)
    args = parser.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")
    results = {"parts": args.parts}
    server, endpoint = start_moto()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = load_settings(overrides=[f"lake={tmp}/lake", f"state_dir={tmp}/state"], environ={})
            s3 = load_settings(
                overrides=[
                    "lake=s3://bench/lake",
                    f"state_dir={tmp}/state",
                    f"s3.endpoint_url={endpoint}",
                    "s3.region=us-east-1",
                ],
                environ={},
            )
            for name, settings in (("local", local), ("s3", s3)):
                for key, value in measure(settings, args.parts, args.rows_per_part).items():
                    results[f"{name}_{key}"] = value
    finally:
        server.terminate()
        server.wait()
    print(f"{'what':<52} {'seconds':>8}")
    for name in ("local", "s3"):
        print(f"{f'commit {args.parts} parts, {name}':<52} {results[f'{name}_commit_s']:>8}")
        print(
            f"{f'commit {args.parts} parts after a conflict (half rewritten), {name}':<52} "
            f"{results[f'{name}_commit_after_conflict_s']:>8}"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
