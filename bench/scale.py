"""Scale-out: each stage on a standalone cluster of 1 worker, then 2 workers, of one core each.

Stages: ingest of generated JPEGs from an S3 bucket (moto server), index with each encoder (random
weights, a small captioner trained first in local mode), a lost executor (the index again on 2 workers,
one executor killed halfway), and a query file against `--captions` generated images (bench/query.py's
references) split into partitions that each build their own index, top-k merged.

Each worker is pinned to a CPU of its own (`--no-pin` to compare): unpinned, a "one-core" worker only has
one task slot, and its JVM threads (shuffle, Arrow, GC) use the idle second core, so 1 worker is not one
core's work. For each stage: throughput on 1 and 2 workers, scaling efficiency (speedup / 2), the start-up
(session and executors) apart, the cores the executors used, time per task, peak memory per executor
(its JVM and Python workers), bytes read and written per image. The index stages also give the encoder
alone on one CPU (forward passes on decoded images, one TensorFlow thread) and the job's task seconds by
step. The lost executor: seconds over the clean 2-worker run, against the lost executor's task seconds,
and each image's captions counted. The query stage also reports each partition's build and query
seconds and checks, on a sample, that the merged top-k equals one engine over the whole sample.

    python -m bench.scale [--images N] [--captions N] [--queries Q] [--encoders vgg16,efficientnet_lite0]
                          [--stages ingest,index,fault,query] [--no-pin]

The last line is one JSON object: index_efficiency, query_efficiency, ingest_efficiency,
index_vs_encoder_alone, fault and the rest.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.index import make_photos, rss
from bench.query import corpus, images_with_references
from cbir.bleu import BleuParams
from cbir.cluster import Cluster, parent_of, processes, standalone_cluster
from cbir.lake import Lake
from cbir.reader import resolve_source
from cbir.references import KINDS
from cbir.settings import Settings, load_settings
from jobs import index, ingest, train
from jobs.job import run as run_job
from jobs.spark import build_session

SMALL_CAPTIONER = ["captioner.units=64", "captioner.embedding_dim=32", "captioner.min_word_count=1", "train.epochs=3"]
STAGES = ("ingest", "index", "fault", "query")
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def settings_for(root: Path, *overrides: str) -> Settings:
    return load_settings(overrides=[f"lake={root}/lake", f"state_dir={root}/state", *overrides], environ={})


class ExecutorUsage:
    """Peak resident memory of each executor (its JVM plus its Python workers), and the CPU seconds all
    executors spent while in use, sampled every 0.5 s. CPU seconds / wall seconds = the cores they used."""

    def __init__(self, cluster: Cluster):
        self.cluster, self.peak_gb, self._stop = cluster, 0.0, threading.Event()
        self._cpu: dict[int, float] = {}  # pid -> its CPU seconds, last seen
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self):
        self._before = {pid: cpu_seconds(pid) for tree in self._trees() for pid in tree}  # start-up's CPU
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def cpu_s(self) -> float:
        return sum(seconds - self._before.get(pid, 0.0) for pid, seconds in self._cpu.items())

    def _trees(self) -> list[set[int]]:
        parents = {pid: parent_of(pid) for pid, _ in processes()}
        trees = []
        for worker in range(len(self.cluster.worker_pids)):
            for executor in self.cluster.executor_pids(worker):
                tree = {executor}
                for _ in range(3):  # executor -> pyspark daemon -> Python workers
                    tree |= {pid for pid, parent in parents.items() if parent in tree}
                trees.append(tree)
        return trees

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            for tree in self._trees():
                self.peak_gb = max(self.peak_gb, sum(rss(pid) for pid in tree) / 2**30)
                self._cpu |= {pid: seconds for pid in tree if (seconds := cpu_seconds(pid))}


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of a live process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def on_cluster(
    cluster: Cluster,
    settings: Settings,
    work: Callable,
    warm_up: Callable | None = None,
    afterwards: Callable | None = None,
) -> dict:
    """Start a session on the cluster (timed apart, until every executor is up), warm_up(spark, settings)
    if given (timed apart), run work(spark, settings) (timed), then afterwards(spark) if given (not timed:
    what it adds to the result is read from the session), stop."""
    workers = len(cluster.worker_pids)
    clock = time.perf_counter()
    cluster_settings = settings.model_copy(update={"spark": settings.spark.model_copy(update={"master": cluster.url})})
    spark = build_session(cluster_settings, cluster)  # with the cluster's secret
    spark.sparkContext.parallelize(range(workers * 4), workers * 4).map(lambda x: x).count()  # executors up
    startup = time.perf_counter() - clock
    try:
        clock = time.perf_counter()
        if warm_up:
            warm_up(spark, cluster_settings)
        warm_up_s = time.perf_counter() - clock
        with ExecutorUsage(cluster) as usage:
            clock = time.perf_counter()
            result = work(spark, cluster_settings)
            seconds = time.perf_counter() - clock
        if afterwards:
            result |= afterwards(spark)
    finally:
        spark.stop()
    return {
        "startup_s": startup,
        "warm_up_s": warm_up_s,
        "seconds": seconds,
        "executor_peak_gb": usage.peak_gb,
        "cores_used": usage.cpu_s / seconds,
        **result,
    }


# Stages: work(spark, settings) -> what it did ("items" and the rest), on a fresh copy of its input.
def ingest_stage(bucket: str):
    def work(spark, settings):
        lake = Lake.open(settings)
        lake.check()
        summary = run_job(ingest.IngestJob(lake, settings, resolve_source(f"s3://{bucket}/photos", settings)), spark)
        return {"items": summary.probed, "bytes_written": summary.bytes, "retried_tasks": summary.retried_tasks}

    return work


def index_warm_up(photos: Path):
    """Index the lake's warm-up images (each executor's Python worker loads TensorFlow and the models, as
    a long run's does once), then ingest `photos` for the measured index (ingest is measured apart)."""

    def warm_up(spark, settings):
        lake = Lake.open(settings)
        run_job(index.IndexJob(lake, settings), spark)
        run_job(ingest.IngestJob(lake, settings, resolve_source(str(photos), settings)), spark)

    return warm_up


def index_work(spark, settings) -> dict:
    lake = Lake.open(settings)
    before = folder_bytes(Path(settings.lake))
    summary = run_job(index.IndexJob(lake, settings), spark)
    return {
        "items": summary.indexed + sum(summary.failed.values()),
        "task_s": sum(summary.stages.values()),
        "steps_s": summary.stages,
        "bytes_written": folder_bytes(Path(settings.lake)) - before,
        "retried_tasks": summary.retried_tasks,
    }


def query_stage(captions_folder: Path, queries: list[list[str]], partitions: int):
    from jobs.captions import table_captions
    from jobs.search import search
    from search.queries import Query
    from search.searcher import Rules, bleu_plans

    asked = [Query(f"q{i}", 10, text=" ".join(q)) for i, q in enumerate(queries)]

    def work(spark, settings):
        captions = table_captions(spark, str(captions_folder), settings)
        rows = search(spark, captions, bleu_plans(asked), Rules(BleuParams(), KINDS), partitions=partitions).count()
        return {"items": captions.rows, "hits": rows, "tasks": partitions}

    return work


def partition_times(spark, captions_folder: Path, queries, partitions: int, settings) -> list[dict]:
    """Each partition's index build and query seconds and rows, as the query job's tasks spend them."""
    from jobs.captions import table_captions
    from search.index import Index

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
    from jobs.search import search
    from search.index import Index
    from search.queries import Query
    from search.searcher import Rules, bleu_plans

    folder = root / "sample"
    folder.mkdir(exist_ok=True)
    table = images_with_references(sample, 20_000, seed=7).append_column("uri", pa.array([""] * sample))
    pq.write_table(table, folder / "part.parquet", row_group_size=5_000)
    asked = [Query(f"q{i}", 10, text=" ".join(q)) for i, q in enumerate(queries)]
    rows = search(
        spark, table_captions(spark, str(folder), settings), bleu_plans(asked), Rules(BleuParams(), KINDS), partitions=4
    )
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


def prepare_index_lake(root: Path, encoder: str, photos: Path) -> Path:
    """A local lake for `encoder`, made in local mode: a small captioner trained on 24 of `photos`, and
    16 other photos ingested to warm the executors up with."""
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
        run_job(train.TrainJob(lake, settings, str(root / "train.csv")), spark)
        # The training features are cached: drop them, so every image is encoded by the measured run.
        shutil.rmtree(Path(settings.lake) / "features")
        make_photos(root / "warm-up", 16, first=10**6)
        run_job(ingest.IngestJob(lake, settings, resolve_source(str(root / "warm-up"), settings)), spark)
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
        "warm_up_s_1": round(one["warm_up_s"], 1),
        "warm_up_s_2": round(two["warm_up_s"], 1),
        "cores_used_1": round(one["cores_used"], 2),
        "cores_used_2": round(two["cores_used"], 2),
        "task_s": round(two.get("task_s", two["seconds"] * 2) / max(1, two.get("tasks", 8)), 2),
        "executor_peak_gb": round(max(one["executor_peak_gb"], two["executor_peak_gb"]), 2),
        "bytes_written_per_item": round(two.get("bytes_written", 0) / max(1, two["items"])),
        "retried_tasks": two.get("retried_tasks", 0),
        "steps_s": {step: round(seconds, 1) for step, seconds in two.get("steps_s", {}).items()},
    }


def run_stage(
    root: Path,
    settings: Settings,
    work: Callable,
    pin: bool,
    fresh: Callable[[Path], Path] | None = None,
    warm_up: Callable | None = None,
) -> dict[int, dict]:
    runs = {}
    for workers in (1, 2):
        lake_root = fresh(root / f"run-{workers}") if fresh else root
        stage_settings = settings.model_copy(update={"lake": f"{lake_root}/lake"}) if fresh else settings
        with standalone_cluster(root / f"cluster-{workers}", workers, 1, "3g", pin) as cluster:
            runs[workers] = on_cluster(cluster, stage_settings, work, warm_up)
    return runs


def encoder_alone(encoder: str, photos: Path, images: int = 256) -> float:
    """The encoder's forward passes alone on one CPU and one TensorFlow thread, as a one-core worker's task
    runs them, over photos decoded beforehand: images per second. In a process of its own (threads are
    set before TensorFlow's first use)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_encode_on_one_cpu, (encoder, sorted(photos.glob("*"))[:images]))


def _encode_on_one_cpu(encoder: str, paths: list[Path]) -> float:
    from models.encoders import configure_tensorflow, image_size, load_encoder, pixels

    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    configure_tensorflow(1)
    settings = load_settings(environ={})
    model = load_encoder(encoder, "random", settings.encoder.precision)
    batch = settings.encoder.batch_size
    decoded = np.stack([pixels(path.read_bytes(), image_size(encoder)) for path in paths])
    model.encode(decoded[:batch])  # trace once
    clock = time.perf_counter()
    for i in range(0, len(decoded), batch):
        model.encode(decoded[i : i + batch])
    return len(decoded) / (time.perf_counter() - clock)


def lost_executor_cost(spark) -> dict:
    """From the driver's REST API: the executors lost, the seconds every task attempt they ran took (in
    every stage: their finished map outputs are lost with them), and the failed task attempts."""
    context = spark.sparkContext
    base = f"{context.uiWebUrl}/api/v1/applications/{context.applicationId}"

    def get(path: str):
        with urllib.request.urlopen(base + path, timeout=30) as response:
            return json.load(response)

    time.sleep(2)  # the UI's listener catches up with the last events
    lost = {e["id"] for e in get("/allexecutors") if not e["isActive"] and e["id"] != "driver"}
    tasks = [task for stage in get("/stages?details=true") for task in (stage.get("tasks") or {}).values()]
    failed = [t for t in tasks if t["status"] != "SUCCESS"]
    return {
        "lost_executors": len(lost),
        "lost_executor_tasks_s": sum(t.get("duration", 0) for t in tasks if t["executorId"] in lost) / 1000,
        "failed_attempts": len(failed),
        "failed_attempts_s": sum(t.get("duration", 0) for t in failed) / 1000,
    }


def fault_run(root: Path, settings: Settings, base: Path, photos: Path, clean_s: float, pin: bool) -> dict:
    """Index on 2 workers again, worker 1's executor killed halfway (by the clean run's time); then count
    each image's captions. Its cost: seconds over the clean run, against its tasks' time."""
    run = root / "fault"
    shutil.copytree(base / "lake", run / "lake")
    settings = settings.model_copy(
        update={"lake": f"{run}/lake", "spark": settings.spark.model_copy(update={"ui": True})}
    )
    with standalone_cluster(root / "cluster-fault", 2, 1, "3g", pin) as cluster:

        def work(spark, settings):
            killer = threading.Timer(clean_s / 2, cluster.kill_executors, (1,))
            killer.start()
            try:
                return index_work(spark, settings)
            finally:
                killer.cancel()

        result = on_cluster(cluster, settings, work, index_warm_up(photos), lost_executor_cost)
    ids = Lake.open(settings).table("captions").dataset().to_table(columns=["image_id"]).column("image_id")
    return result | {
        "clean_s": clean_s,
        "extra_s": result["seconds"] - clean_s,
        "captions": len(ids),
        "images_captioned": len(set(ids.to_pylist())),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1_200, help="images to ingest and index")
    parser.add_argument("--captions", type=int, default=10_000_000, help="generated images the query searches")
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--encoders", default="vgg16,efficientnet_lite0")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"which of {','.join(STAGES)} (default all)")
    parser.add_argument(
        "--no-pin", dest="pin", action="store_false", help="let workers use any CPU (`cores` then counts slots only)"
    )
    args = parser.parse_args()
    stages = set(args.stages.split(","))
    if stages - set(STAGES) or ("fault" in stages and "index" not in stages):
        parser.error(f"--stages: some of {','.join(STAGES)}; fault needs index (its clean run)")
    os.environ.update(S3_KEYS)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    results: list[dict] = []
    summary = {"images": args.images, "captions": args.captions, "queries": args.queries, "pinned": args.pin}
    with tempfile.TemporaryDirectory(prefix="cbir-scale-") as tmp:
        root = Path(tmp)
        photos = root / "photos"
        make_photos(photos, args.images)
        image_bytes = round(folder_bytes(photos) / args.images)
        if "ingest" in stages:
            results.append(measure_ingest(root, photos, args.pin) | {"bytes_read_per_item": image_bytes})
            summary["ingest_efficiency"] = results[-1]["efficiency"]
        if "index" in stages:
            for encoder in args.encoders.split(","):
                base = prepare_index_lake(root / f"prepared-{encoder}", encoder, photos)
                settings = settings_for(root, f"encoder.name={encoder}", "encoder.weights=random", *SMALL_CAPTIONER)

                def fresh(run: Path, base=base) -> Path:
                    shutil.copytree(base / "lake", run / "lake")
                    return run

                runs = run_stage(
                    root / f"index-{encoder}", settings, index_work, args.pin, fresh, index_warm_up(photos)
                )
                alone = encoder_alone(encoder, photos)
                results.append(
                    compare(f"index {encoder}", runs)
                    | {"bytes_read_per_item": image_bytes, "encoder_alone_per_s": round(alone, 2)}
                )
                if "fault" in stages and "fault" not in summary:
                    summary["fault"] = fault_run(root, settings, base, photos, runs[2]["seconds"], args.pin)
            index_rows = [r for r in results if r["stage"].startswith("index")]
            summary["index_efficiency"] = round(float(np.mean([r["efficiency"] for r in index_rows])), 3)
            summary["index_vs_encoder_alone"] = {
                r["stage"].split(" ")[1]: round(r["per_s_2"] / 2 / r["encoder_alone_per_s"], 3) for r in index_rows
            }
        if "query" in stages:
            query, parts, exact = measure_query(root, args.captions, args.queries, args.pin)
            results.append(query)
            summary |= {
                "query_efficiency": query["efficiency"],
                "merged_equals_single": exact,
                "partition_build_s": [round(p["build_s"], 2) for p in parts],
                "partition_query_s": [round(p["query_s"], 2) for p in parts],
            }
    report(results, summary)


def measure_ingest(root: Path, photos: Path, pin: bool) -> dict:
    """Ingest from a moto S3 bucket on this machine into an empty local lake."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto logs every request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        endpoint = "http://{}:{}".format(*server.get_host_and_port())
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="photos")
        for path in sorted(photos.glob("*")):
            s3.upload_file(str(path), "photos", f"photos/{path.name}")

        def empty_lake(run: Path) -> Path:
            run.mkdir(parents=True)
            return run

        settings = settings_for(root, f"s3.endpoint_url={endpoint}", "s3.region=us-east-1")
        runs = run_stage(root / "ingest", settings, ingest_stage("photos"), pin, empty_lake)
    finally:
        server.stop()
    return compare("ingest from S3", runs)


def measure_query(root: Path, captions: int, queries_n: int, pin: bool) -> tuple[dict, list[dict], bool]:
    """The query job over `captions` generated images in partitions of 500k; then, on 2 workers, each
    partition's build and query seconds, and the merged top-k against one engine on a sample."""
    captions_folder = root / "captions"
    captions_bytes = write_captions(captions_folder, captions)
    queries = corpus(queries_n, 20_000, seed=4, short_share=0.25)
    partitions = max(4, -(-captions // 500_000))
    settings = settings_for(root)
    runs = run_stage(root / "query", settings, query_stage(captions_folder, queries, partitions), pin)
    query = compare(f"query {queries_n:,} x {captions:,}", runs)
    query["bytes_read_per_item"] = round(captions_bytes / captions)
    with standalone_cluster(root / "cluster-parts", 2, 1, "3g", pin) as cluster:
        on_cluster_settings = settings.model_copy(
            update={"spark": settings.spark.model_copy(update={"master": cluster.url})}
        )
        spark = build_session(on_cluster_settings, cluster)
        try:
            parts = partition_times(spark, captions_folder, queries, partitions, on_cluster_settings)
            exact = merged_equals_single(spark, root, queries[:50], on_cluster_settings)
        finally:
            spark.stop()
    return query, parts, exact


def report(results: list[dict], summary: dict) -> None:
    print(f"workers pinned to a CPU each: {summary['pinned']}")
    print(
        f"{'stage':<34}{'items':>10}{'/s 1w':>9}{'/s 2w':>9}{'eff':>7}{'start 1w':>10}{'start 2w':>10}"
        f"{'warm 1w':>9}{'warm 2w':>9}{'cores 1w':>10}{'cores 2w':>10}{'s/task':>8}{'exec GB':>9}"
        f"{'B in/item':>11}{'B out/item':>11}{'retried':>9}"
    )
    for r in results:
        print(
            f"{r['stage']:<34}{r['items']:>10,}{r['per_s_1']:>9.2f}{r['per_s_2']:>9.2f}{r['efficiency']:>7.3f}"
            f"{r['startup_s_1']:>10.1f}{r['startup_s_2']:>10.1f}{r['warm_up_s_1']:>9.1f}{r['warm_up_s_2']:>9.1f}"
            f"{r['cores_used_1']:>10.2f}{r['cores_used_2']:>10.2f}"
            f"{r['task_s']:>8.2f}{r['executor_peak_gb']:>9.2f}{r['bytes_read_per_item']:>11,}"
            f"{r['bytes_written_per_item']:>11,}{r['retried_tasks']:>9}"
        )
    for r in results:
        if "encoder_alone_per_s" in r:
            print(
                f"{r['stage']}: the encoder alone on one CPU {r['encoder_alone_per_s']:.2f} img/s; the job per "
                f"worker {r['per_s_1']:.2f} (1 worker), {r['per_s_2'] / 2:.2f} (2 workers); task seconds by step "
                f"(2 workers): " + ", ".join(f"{step} {s:.1f}" for step, s in r["steps_s"].items())
            )
    if fault := summary.get("fault"):
        print(
            f"lost executor ({fault['lost_executors']} lost, {fault['failed_attempts']} attempts failed, "
            f"{fault['retried_tasks']} tasks retried): {fault['seconds']:.1f} s against "
            f"{fault['clean_s']:.1f} s clean, "
            f"{fault['extra_s']:.1f} s more; the lost executor's tasks took {fault['lost_executor_tasks_s']:.1f} s "
            f"(its failed attempts {fault['failed_attempts_s']:.1f} s); "
            f"{fault['captions']} captions of {fault['images_captioned']} images ({fault['items']} indexed)"
        )
    if "partition_build_s" in summary:
        print(f"query partitions (2 workers): build s {summary['partition_build_s']}")
        print(f"query partitions (2 workers): query s {summary['partition_query_s']}")
        print(f"merged top-10 equals one engine on a 20,000-image sample: {summary['merged_equals_single']}")
    print(json.dumps(summary | {"stages": {r["stage"]: r for r in results}}))


if __name__ == "__main__":
    main()
