"""Scale-out: each stage on a standalone cluster of 1 worker, then 2 workers, of one core each.

Stages: ingest of generated JPEGs from an S3 bucket (moto server), index with each encoder (random
weights, a small captioner trained first in local mode), and a query file against `--captions` generated
images (bench/query.py's references) split into partitions that each build their own index, top-k merged.
For each: throughput on 1 and 2 workers, scaling efficiency (speedup / 2), the start-up (session and
executors) apart, time per task, peak memory per executor (its JVM and Python workers), bytes read and
written per image. The query stage also reports each partition's build and query seconds and checks,
on a sample, that the merged top-k equals one engine over the whole sample.

    python -m bench.scale [--images N] [--captions N] [--queries Q] [--encoders vgg16,efficientnet_lite0]

The last line is one JSON object: index_efficiency, query_efficiency, ingest_efficiency and the rest.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.index import make_photos, rss
from bench.query import corpus, images_with_references
from cbir.bleu import BleuParams
from cbir.lake import Lake
from cbir.references import KINDS
from cbir.settings import Settings, load_settings
from jobs import index, ingest, train
from jobs.cluster import Cluster, parent_of, processes, standalone_cluster
from jobs.datasets import read_dataset
from jobs.reader import resolve_source
from jobs.spark import build_session

SMALL_CAPTIONER = ["captioner.units=64", "captioner.embedding_dim=32", "captioner.min_word_count=1", "train.epochs=3"]
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def settings_for(root: Path, *overrides: str) -> Settings:
    return load_settings(overrides=[f"lake={root}/lake", f"state_dir={root}/state", *overrides], environ={})


class ExecutorMemory:
    """Peak resident memory of each executor (its JVM plus its Python workers), sampled every 0.5 s."""

    def __init__(self, cluster: Cluster):
        self.cluster, self.peak_gb, self._stop = cluster, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            running = list(processes())
            parents = {pid: parent_of(pid) for pid, _ in running}
            for worker in range(len(self.cluster.worker_pids)):
                for executor in self.cluster.executor_pids(worker):
                    tree = {executor}
                    for _ in range(3):  # executor -> pyspark daemon -> Python workers
                        tree |= {pid for pid, parent in parents.items() if parent in tree}
                    self.peak_gb = max(self.peak_gb, sum(rss(pid) for pid in tree) / 2**30)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def on_cluster(cluster: Cluster, settings: Settings, work: Callable) -> dict:
    """Start a session on the cluster (timed apart, until every executor is up), run work(spark), stop."""
    workers = len(cluster.worker_pids)
    clock = time.perf_counter()
    cluster_settings = settings.model_copy(update={"spark": settings.spark.model_copy(update={"master": cluster.url})})
    spark = build_session(cluster_settings)
    spark.sparkContext.parallelize(range(workers * 4), workers * 4).map(lambda x: x).count()  # executors up
    startup = time.perf_counter() - clock
    try:
        with ExecutorMemory(cluster) as memory:
            clock = time.perf_counter()
            result = work(spark, cluster_settings)
            seconds = time.perf_counter() - clock
    finally:
        spark.stop()
    return {"startup_s": startup, "seconds": seconds, "executor_peak_gb": memory.peak_gb, **result}


# Stages: each returns (work(spark, settings) -> dict, items) for a fresh copy of its input.
def ingest_stage(root: Path, endpoint: str, bucket: str):
    def work(spark, settings):
        lake = Lake.open(settings)
        lake.check()
        summary = ingest.run(spark, lake, settings, resolve_source(f"s3://{bucket}/photos", settings))
        return {"items": summary.probed, "bytes_written": summary.bytes, "retried_tasks": summary.retried_tasks}

    return work


def index_stage(prepared: Path):
    def work(spark, settings):
        lake = Lake.open(settings)
        before = folder_bytes(Path(settings.lake))
        summary = index.run(spark, lake, settings)
        task_s = sum(summary.stages.values())
        return {
            "items": summary.indexed + sum(summary.failed.values()),
            "task_s": task_s,
            "bytes_written": folder_bytes(Path(settings.lake)) - before,
            "retried_tasks": summary.retried_tasks,
        }

    return work


def query_stage(captions_folder: Path, queries: list[list[str]], partitions: int):
    from jobs.captions import table_captions
    from jobs.queries import Query
    from jobs.search import search

    asked = [Query(f"q{i}", 10, text=" ".join(q)) for i, q in enumerate(queries)]

    def work(spark, settings):
        captions = table_captions(spark, str(captions_folder), settings)
        rows = search(spark, captions, asked, BleuParams(), KINDS, partitions=partitions).count()
        return {"items": captions.rows, "hits": rows, "tasks": partitions}

    return work


def partition_times(spark, captions_folder: Path, queries, partitions: int, settings) -> list[dict]:
    """Each partition's index build and query seconds and rows, as the query job's tasks spend them."""
    from jobs.captions import table_captions
    from jobs.searcher import Index

    params = BleuParams()

    def timed(batches):
        batches = list(batches)
        if not batches:
            return
        table = pa.Table.from_batches(batches)
        clock = time.perf_counter()
        built = Index.build(table, KINDS, params.max_order)
        build_s = time.perf_counter() - clock
        clock = time.perf_counter()
        for q in queries:
            built.search(q, 10, params)
        query_s = time.perf_counter() - clock
        yield pa.RecordBatch.from_pylist([{"rows": table.num_rows, "build_s": build_s, "query_s": query_s}])

    frame = table_captions(spark, str(captions_folder), settings).frame
    out = frame.repartition(partitions, "image_id").mapInArrow(timed, "rows long, build_s double, query_s double")
    return [row.asDict() for row in out.collect()]


def merged_equals_single(spark, root: Path, queries, settings, sample: int = 20_000) -> bool:
    """On a sample: the job's top 10 over 4 partitions, merged, equals one engine over the whole sample."""
    from jobs.captions import table_captions
    from jobs.queries import Query
    from jobs.search import search
    from jobs.searcher import Index

    folder = root / "sample"
    folder.mkdir(exist_ok=True)
    table = images_with_references(sample, 20_000, seed=7).append_column("uri", pa.array([""] * sample))
    pq.write_table(table, folder / "part.parquet", row_group_size=5_000)
    asked = [Query(f"q{i}", 10, text=" ".join(q)) for i, q in enumerate(queries)]
    rows = search(spark, table_captions(spark, str(folder), settings), asked, BleuParams(), KINDS, partitions=4)
    got: dict[str, list] = {}
    for row in sorted(rows.collect(), key=lambda r: (r["query_id"], r["rank"])):
        got.setdefault(row["query_id"], []).append((row["image_id"], row["score"]))
    single = Index.build(table, KINDS, BleuParams().max_order)
    expected = {
        f"q{i}": [(h["image_id"], h["score"]) for h in single.search(q, 10, BleuParams())]
        for i, q in enumerate(queries)
    }
    return all(got.get(key, []) == hits for key, hits in expected.items())


def write_captions(folder: Path, n: int, chunk: int = 500_000) -> int:
    """n generated images in Parquet files of `chunk` rows (bounded memory at 10M)."""
    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        table = images_with_references(rows, 20_000, seed=100 + start // chunk)
        ids = pa.array([f"{start + i:09d}" for i in range(rows)])
        table = table.set_column(0, "image_id", ids).append_column("uri", pa.array([""] * rows))
        pq.write_table(table, folder / f"part-{start // chunk:05d}.parquet", row_group_size=100_000)
    return folder_bytes(folder)


def prepare_index_lake(root: Path, encoder: str, photos: Path, images: int) -> Path:
    """A local lake with `images` ingested photos and a small captioner for `encoder`, made in local mode."""
    settings = settings_for(root, f"encoder.name={encoder}", "encoder.weights=random", *SMALL_CAPTIONER)
    spark = build_session(settings)
    try:
        lake = Lake.open(settings)
        lake.check()
        train_rows = [
            {"uri": str(p), "caption": f"a photo number {i % 7}"} for i, p in enumerate(sorted(photos.glob("*"))[:24])
        ]
        with open(root / "train.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, ["uri", "caption"])
            writer.writeheader()
            writer.writerows(train_rows)
        train.run(spark, lake, settings, read_dataset(str(root / "train.csv"), settings))
        ingest.run(spark, lake, settings, resolve_source(str(photos), settings))
        # The training features are cached: drop them, so every image is encoded by the measured run.
        shutil.rmtree(Path(settings.lake) / "features")
    finally:
        spark.stop()
    return root


def compare(name: str, runs: dict[int, dict]) -> dict:
    one, two = runs[1], runs[2]
    rate = {w: r["items"] / r["seconds"] for w, r in runs.items()}
    speedup = rate[2] / rate[1]
    return {
        "stage": name,
        "items": one["items"],
        "per_s_1": round(rate[1], 2),
        "per_s_2": round(rate[2], 2),
        "efficiency": round(speedup / 2, 3),
        "startup_s_1": round(one["startup_s"], 1),
        "startup_s_2": round(two["startup_s"], 1),
        "task_s": round(two.get("task_s", two["seconds"] * 2) / max(1, two.get("tasks", 8)), 2),
        "executor_peak_gb": round(max(one["executor_peak_gb"], two["executor_peak_gb"]), 2),
        "bytes_written_per_item": round(two.get("bytes_written", 0) / max(1, two["items"])),
        "retried_tasks": two.get("retried_tasks", 0),
    }


def run_stage(root: Path, settings: Settings, work, fresh: Callable[[Path], Path] | None = None) -> dict[int, dict]:
    runs = {}
    for workers in (1, 2):
        lake_root = fresh(root / f"run-{workers}") if fresh else root
        stage_settings = settings.model_copy(update={"lake": f"{lake_root}/lake"}) if fresh else settings
        with standalone_cluster(root / f"cluster-{workers}", workers=workers, cores=1, memory="3g") as cluster:
            runs[workers] = on_cluster(cluster, stage_settings, work)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400, help="images to ingest and index")
    parser.add_argument("--captions", type=int, default=10_000_000, help="generated images the query searches")
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--encoders", default="vgg16,efficientnet_lite0")
    args = parser.parse_args()
    os.environ.update(S3_KEYS)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto logs every request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = "http://{}:{}".format(*server.get_host_and_port())
    results = []
    with tempfile.TemporaryDirectory(prefix="cbir-scale-") as tmp:
        root = Path(tmp)
        photos = root / "photos"
        make_photos(photos, args.images)
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="photos")
        for path in sorted(photos.glob("*")):
            s3.upload_file(str(path), "photos", f"photos/{path.name}")
        source_bytes = folder_bytes(photos)
        s3_settings = [f"s3.endpoint_url={endpoint}", "s3.region=us-east-1"]

        def empty_lake(run: Path) -> Path:
            run.mkdir(parents=True)
            return run

        ingest_runs = run_stage(
            root / "ingest", settings_for(root, *s3_settings), ingest_stage(root, endpoint, "photos"), empty_lake
        )
        results.append(
            compare("ingest from S3", ingest_runs) | {"bytes_read_per_item": round(source_bytes / args.images)}
        )

        for encoder in args.encoders.split(","):
            base = prepare_index_lake(root / f"prepared-{encoder}", encoder, photos, args.images)
            overrides = (f"encoder.name={encoder}", "encoder.weights=random", *SMALL_CAPTIONER)

            def fresh(run: Path, base=base) -> Path:
                shutil.copytree(base / "lake", run / "lake")
                return run

            runs = run_stage(root / f"index-{encoder}", settings_for(root, *overrides), index_stage(base), fresh)
            image_bytes = source_bytes / args.images
            results.append(compare(f"index {encoder}", runs) | {"bytes_read_per_item": round(image_bytes)})

        captions_folder = root / "captions"
        captions_bytes = write_captions(captions_folder, args.captions)
        queries = corpus(args.queries, 20_000, seed=4, short_share=0.25)
        partitions = max(4, -(-args.captions // 500_000))
        query_settings = settings_for(root)
        runs = run_stage(root / "query", query_settings, query_stage(captions_folder, queries, partitions))
        query = compare(f"query {args.queries:,} x {args.captions:,}", runs)
        query["bytes_read_per_item"] = round(captions_bytes / args.captions)
        with standalone_cluster(root / "cluster-parts", workers=2, cores=1, memory="3g") as cluster:
            on_cluster_settings = query_settings.model_copy(
                update={"spark": query_settings.spark.model_copy(update={"master": cluster.url})}
            )
            spark = build_session(on_cluster_settings)
            try:
                parts = partition_times(spark, captions_folder, queries, partitions, on_cluster_settings)
                exact = merged_equals_single(spark, root, queries[:50], on_cluster_settings)
            finally:
                spark.stop()
        results.append(query)
    server.stop()

    print(
        f"{'stage':<34}{'items':>10}{'/s 1w':>9}{'/s 2w':>9}{'eff':>7}{'start 1w':>10}{'start 2w':>10}"
        f"{'s/task':>8}{'exec GB':>9}{'B in/item':>11}{'B out/item':>11}{'retried':>9}"
    )
    for r in results:
        print(
            f"{r['stage']:<34}{r['items']:>10,}{r['per_s_1']:>9.2f}{r['per_s_2']:>9.2f}{r['efficiency']:>7.3f}"
            f"{r['startup_s_1']:>10.1f}{r['startup_s_2']:>10.1f}{r['task_s']:>8.2f}{r['executor_peak_gb']:>9.2f}"
            f"{r['bytes_read_per_item']:>11,}{r['bytes_written_per_item']:>11,}{r['retried_tasks']:>9}"
        )
    print(f"query partitions (2 workers): {len(parts)}; rows, build s, query s each:")
    for part in parts:
        print(f"  {part['rows']:>10,} {part['build_s']:>8.2f} {part['query_s']:>8.2f}")
    print(f"merged top-10 equals one engine on a 20,000-image sample: {exact}")
    by_stage = {
        r["stage"].split(" ")[0] + ("_" + r["stage"].split(" ")[1] if r["stage"].startswith("index") else ""): r
        for r in results
    }
    index_runs = [r for r in results if r["stage"].startswith("index")]
    print(
        json.dumps(
            {
                "index_efficiency": round(float(np.mean([r["efficiency"] for r in index_runs])), 3),
                "query_efficiency": query["efficiency"],
                "ingest_efficiency": results[0]["efficiency"],
                "images": args.images,
                "captions": args.captions,
                "queries": args.queries,
                "merged_equals_single": exact,
                "partition_build_s": [round(p["build_s"], 2) for p in parts],
                "partition_query_s": [round(p["query_s"], 2) for p in parts],
                "stages": by_stage,
            }
        )
    )


if __name__ == "__main__":
    main()
