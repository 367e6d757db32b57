"""cbir web: text query latency through the HTTP API over N captions, against the engine called directly.

1. N generated images with the default references each (bench/query.py's: three captions of 8 to
   15 words, two labels, three neighbours, a title and tags, Zipf-like over 20,000 words), with
   sha256-like image ids, are committed to a temporary lake as one captions run.
2. `cbir web` starts on a free port, as an operator starts it, and loads them; load_s is the time
   from the command's start to its first answer, server_rss_gb its memory after the queries.
3. Q queries drawn the same way (a quarter of them one to three words), k=10, one after another
   through GET /api/search on one keep-alive connection, timed at the client from request to
   the whole body read (text_p50_ms, text_p95_ms); inside the server, the time in the index
   (the answer's took_ms); a sample through the page, GET /?q= (HTML with the result grid); and a
   sample again with 2 positive and 1 negative example images of the lake drawn at random, as the
   page's "search again" asks it (examples_p50_ms, examples_p95_ms).
4. The baseline, after the server has stopped: the same queries on a BleuIndex built in this
   process, BleuIndex.search called directly on one thread (engine_p50_ms, engine_p95_ms). The
   difference is what HTTP, FastAPI and JSON add.

    .venv/bin/python -m bench.web [--captions N] [--queries Q]

Prints a table, then one JSON line: captions, text_p50_ms, text_p95_ms, engine_p50_ms, engine_p95_ms,
server_engine_p50_ms, page_p50_ms, page_p95_ms, examples_p50_ms, examples_p95_ms, load_s, server_rss_gb,
queries, no_match.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pyarrow as pa

from bench.query import corpus, images_with_references
from cbir.lake import Lake, new_run_id
from cbir.references import build_index, reference_texts
from cbir.schemas import CAPTIONS
from cbir.settings import load_settings
from cbir.storage import put_bytes
from cbir.text import words
from models.card import EncoderInfo, ModelCard
from models.neighbours import PROJECTED_DIM, Memory
from search.index import bleu_params

FEATURE_DIM = 32  # the card's encoder: text queries need no model
MEMORY_IMAGES = 100_000  # captioner.memory_images' default
VERSION = "20260101T000000Z-0000beec"  # a version name as the lake checks it: a run id
WARM_UP = 20  # queries before timing: the first one may compile the engine's kernels


def write_lake(root: Path, n: int) -> pa.Table:
    """n images' captions and references committed as one run of captioner version VERSION, which the
    lake calls current."""
    settings = load_settings(overrides=[f"lake={root}/lake", f"state_dir={root}/state"], environ={})
    lake = Lake.open(settings)
    lake.check()
    ids = [hashlib.sha256(i.to_bytes(8, "little")).hexdigest() for i in range(n)]
    images = images_with_references(n, 20_000, seed=3)
    images = images.set_column(0, "image_id", pa.array(ids, pa.string()))
    captions, references = images.column("caption").combine_chunks(), images.column("references").combine_chunks()
    table, run_id = lake.table("captions"), new_run_id()
    writer = table.part_writer(run_id)
    at = pa.scalar(0, pa.timestamp("us", tz="UTC"))
    for start in range(0, n, 250_000):
        rows = min(250_000, n - start)
        writer.write(
            pa.RecordBatch.from_pydict(
                {
                    "image_id": ids[start : start + rows],
                    "uri": [None] * rows,
                    "caption": captions.slice(start, rows),
                    "logprob": [0.0] * rows,
                    "references": references.slice(start, rows),
                    "visual": visual_vectors(rows, seed=start),
                    "model_version": [VERSION] * rows,
                    "status": ["ok"] * rows,
                    "error": [None] * rows,
                    "reason": [None] * rows,
                    "indexed_at": pa.repeat(at, rows),
                    "run_id": [run_id] * rows,
                },
                schema=CAPTIONS,
            )
        )
    table.commit(run_id, [writer.close()], model_version=VERSION)
    put_bytes(lake.fs, lake.path("models", "captioner", "current"), VERSION.encode(), overwrite=True)
    card = ModelCard(
        version=VERSION,
        encoder=EncoderInfo(name="vgg16", weights="random", key="vgg16-random", feature_dim=FEATURE_DIM),
    )  # what cbir search reads of a version (no model: text queries need none)
    put_bytes(lake.fs, lake.path("models", "captioner", VERSION, "card.json"), card.to_json().encode())
    put_bytes(lake.fs, lake.path("models", "captioner", VERSION, "memory.npz"), memory(captions).to_bytes())
    return images


def visual_vectors(n: int, seed: int) -> pa.Array:
    """n random unit vectors in a memory's space, as the index job stores them (float16 bytes)."""
    vectors = _unit(np.random.default_rng(seed).normal(size=(n, PROJECTED_DIM))).astype("<f2")
    return pa.Array.from_buffers(
        pa.binary(),
        n,
        [None, pa.py_buffer(np.arange(n + 1, dtype=np.int32) * vectors.shape[1] * 2), pa.py_buffer(vectors)],
    )


def memory(captions: pa.Array) -> Memory:
    """A captioner memory as big as the default one remembers, its texts from the corpus: what text queries
    borrow a picture from."""
    n = min(MEMORY_IMAGES, len(captions))
    vectors = _unit(np.random.default_rng(7).normal(size=(n, PROJECTED_DIM))).astype(np.float16)
    basis = np.eye(FEATURE_DIM, PROJECTED_DIM, dtype=np.float32)
    return Memory(np.zeros(FEATURE_DIM, np.float32), basis, vectors, np.array(captions.slice(0, n).to_pylist(), str))


def _unit(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def percentiles(ms: list[float]) -> tuple[float, float, float]:
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 95)), float(max(ms))


def get(connection: http.client.HTTPConnection, path: str) -> tuple[int, bytes]:
    connection.request("GET", path)
    response = connection.getresponse()
    return response.status, response.read()


def serve_and_query(root: Path, texts: list[str], page_sample: int, image_ids: list[str]) -> dict:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cbir = str(Path(sys.executable).parent / "cbir")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CBIR_")}
    started = time.perf_counter()
    server = subprocess.Popen(
        [cbir, "web", "--set", f"lake={root}/lake", "--set", f"state_dir={root}/state", "--set", f"web.port={port}"],
        env=environ,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while True:
            if server.poll() is not None:
                raise SystemExit(f"cbir web stopped: {server.stderr.read()[-2000:]}")
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                status, _ = get(connection, "/api/status")
                break
            except OSError:
                time.sleep(0.05)
        load_s = time.perf_counter() - started
        for text in texts[:WARM_UP]:
            get(connection, f"/api/search?q={quote(text)}&k=10")
        client_ms, server_ms, no_match = [], [], 0
        for text in texts:
            clock = time.perf_counter()
            status, body = get(connection, f"/api/search?q={quote(text)}&k=10")
            client_ms.append((time.perf_counter() - clock) * 1000)
            answer = json.loads(body)
            if status == 200:
                server_ms.append(answer["took_ms"])
            elif answer.get("reason") == "no-match":
                no_match += 1
            else:
                raise SystemExit(f"unexpected answer {status}: {body[:300]!r}")
        page_ms = []
        for text in texts[:page_sample]:
            clock = time.perf_counter()
            status, body = get(connection, f"/?q={quote(text)}&k=10")
            page_ms.append((time.perf_counter() - clock) * 1000)
            assert status in (200, 404) and b"<html" in body
        examples_ms, rng = [], np.random.default_rng(5)
        for text in texts[:page_sample]:
            like, unlike = (rng.choice(image_ids, 2, replace=False), rng.choice(image_ids, 1))
            marked = "".join(f"&like={i}" for i in like) + "".join(f"&unlike={i}" for i in unlike)
            clock = time.perf_counter()
            status, body = get(connection, f"/api/search?q={quote(text)}&k=10{marked}")
            examples_ms.append((time.perf_counter() - clock) * 1000)
            assert status in (200, 404), body[:300]
        rss = Path(f"/proc/{server.pid}/status").read_text().split("VmRSS:")[1].split()[0]
        captions = json.loads(get(connection, "/api/status")[1])["captions"]
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    return dict(
        load_s=load_s,
        client_ms=client_ms,
        server_ms=server_ms,
        page_ms=page_ms,
        examples_ms=examples_ms,
        no_match=no_match,
        rss_gb=int(rss) / 2**20,
        captions=captions,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--page-queries", type=int, default=200, help="of the queries, how many also ask the page")
    args = parser.parse_args()
    texts = [" ".join(q) for q in corpus(args.queries, 20_000, seed=4, short_share=0.25)]

    with tempfile.TemporaryDirectory(prefix="cbir-bench-web-") as tmp:
        root = Path(tmp)
        clock = time.perf_counter()
        images = write_lake(root, args.captions)
        write_s = time.perf_counter() - clock
        sample = min(args.page_queries, len(texts))
        served = serve_and_query(root, texts, sample, images.column("image_id").to_pylist()[:100_000])
        assert served["captions"] == args.captions, served["captions"]

        # The baseline: the engine called directly, in this process, once the server is gone.
        params = bleu_params(load_settings(environ={}))
        clock = time.perf_counter()
        index = build_index(images.column("image_id").to_pylist(), reference_texts(images))
        build_s = time.perf_counter() - clock
        asked = [words(text) for text in texts]
        for query in asked[:WARM_UP]:
            index.search(query, 10, params)
        engine_ms = []
        for query in asked:
            clock = time.perf_counter()
            index.search(query, 10, params)
            engine_ms.append((time.perf_counter() - clock) * 1000)
        del index
        gc.collect()

    rows = [
        ("engine: BleuIndex.search in this process", percentiles(engine_ms)),
        ("engine inside the server (the answer's took_ms)", percentiles(served["server_ms"] or [0.0])),
        ("GET /api/search over HTTP, keep-alive", percentiles(served["client_ms"])),
        (f"GET /?q= the page ({len(served['page_ms'])} of the queries)", percentiles(served["page_ms"])),
        ("GET /api/search, 2 positive + 1 negative examples", percentiles(served["examples_ms"])),
    ]
    print(
        f"{args.captions:,} captions, {len(texts):,} text queries (k=10; {served['no_match']} had no known word), "
        f"{os.cpu_count()} cores"
    )
    print(f"{'':<52}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}")
    for label, (p50, p95, top) in rows:
        print(f"{label:<52}{p50:>9.2f}{p95:>9.2f}{top:>9.2f}")
    print(
        f"write the captions run (not counted): {write_s:.1f} s; cbir web start to first answer: "
        f"{served['load_s']:.1f} s; server memory {served['rss_gb']:.2f} GB; in-process index build {build_s:.1f} s"
    )
    engine, text, page = percentiles(engine_ms), percentiles(served["client_ms"]), percentiles(served["page_ms"])
    examples = percentiles(served["examples_ms"])
    print(
        json.dumps(
            {
                "captions": args.captions,
                "text_p50_ms": round(text[0], 3),
                "text_p95_ms": round(text[1], 3),
                "engine_p50_ms": round(engine[0], 3),
                "engine_p95_ms": round(engine[1], 3),
                "server_engine_p50_ms": round(percentiles(served["server_ms"] or [0.0])[0], 3),
                "page_p50_ms": round(page[0], 3),
                "page_p95_ms": round(page[1], 3),
                "examples_p50_ms": round(examples[0], 3),
                "examples_p95_ms": round(examples[1], 3),
                "load_s": round(served["load_s"], 2),
                "server_rss_gb": round(served["rss_gb"], 2),
                "queries": len(texts),
                "no_match": served["no_match"],
            }
        )
    )


if __name__ == "__main__":
    main()
