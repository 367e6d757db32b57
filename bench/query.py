"""BLEU retrieval: the engine against nltk's sentence_bleu loop, then 1,000,000 captions x 10,000 queries.

1. On a sample (3,000 captions): pairs/s of nltk's loop and of the engine asked for every
   caption's score, and the largest difference between them (must be 0: the engine is exact).
2. The engine alone on generated images with the default references each (Zipf-like vocabulary of
   20,000 words): three captions of 8 to 15 words (the 2nd and 3rd differ from the first in two
   words, as a beam's n best do), two labels of 1 to 3 words, three neighbours' titles and a title
   of 2 to 5 words and a line of 3 to 5 tags: 10 texts an image. Queries are drawn the same way, a
   quarter of them one to three words: index build (cbir.references, as cbir web and the query job
   build it) and exact top-10 for every query (BleuIndex.search_many: all cores), with time per
   stage and peak memory; the same queries on one thread are timed apart. Its pairs/s (images x queries / seconds) is
   engine_pairs_per_s: pruning decides most pairs without scoring them.
   Warm: the same index saved as cbir search saves it (search.cache), then opened (memory-mapped)
   and asked the same queries, as cbir search and cbir web do while the lake is unchanged.
3. The same queries through the Spark job (jobs.search.search over a captions table with those
   references), local[*], each run in a new session: without a state folder (every task builds its
   share's index, nothing saved: the job before shares were saved), cold (each task builds its
   share's index and saves it under the state folder) and warm (each task opens its saved share,
   and no caption is read).

    .venv/bin/python -m bench.query [--captions N] [--queries Q]

Prints a table, then one JSON line: engine_pairs_per_s, nltk_pairs_per_s, speedup, max_abs_diff,
big_captions, big_queries, big_run_s, big_warm_run_s, big_spark_run_s, big_spark_cold_run_s,
big_spark_warm_run_s, big_peak_rss_gb.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cbir.bleu import BleuParams
from cbir.engine import BleuIndex
from cbir.references import KINDS, build_index, reference_texts
from cbir.schemas import REFERENCE


def corpus(n: int, vocabulary: int, seed: int, short_share: float = 0.0) -> list[list[str]]:
    """Word sequences with Zipf-distributed words: captions 8-15 words; a share of 1-3 word ones."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, vocabulary + 1)
    p = 1 / ranks**1.07
    p /= p.sum()
    lengths = rng.integers(8, 16, n)
    short = rng.random(n) < short_share
    lengths[short] = rng.integers(1, 4, short.sum())
    words = rng.choice(vocabulary, size=int(lengths.sum()), p=p)
    out, at = [], 0
    for length in lengths:
        out.append([f"w{w}" for w in words[at : at + length]])
        at += length
    return out


REFERENCES = (
    ("caption", 8, 16),
    ("caption", 0, 0),
    ("caption", 0, 0),
    ("label", 1, 4),
    ("label", 1, 4),
    *[("neighbour", 2, 6)] * 3,
    ("title", 2, 6),
    ("tags", 3, 6),
)
# (kind, fewest words, most + 1); (0, 0): a variant of the caption. Ranks count within a kind.
RANKS = [[kind for kind, _, _ in REFERENCES][: i + 1].count(kind) for i, (kind, _, _) in enumerate(REFERENCES)]


def images_with_references(n: int, vocabulary: int, seed: int) -> pa.Table:
    """A captions table of n images: image_id, caption and references (kind, rank, text, score), generated
    in Arrow and numpy (no Python loop per text)."""
    rng = np.random.default_rng(seed)
    p = 1 / np.arange(1, vocabulary + 1) ** 1.07
    p /= p.sum()
    names = pa.array([f"w{i}" for i in range(vocabulary)], pa.string())
    first_lengths = rng.integers(8, 16, n)
    first_words = rng.choice(vocabulary, int(first_lengths.sum()), p=p)
    texts, kinds = [], []
    for kind, low, high in REFERENCES:
        if high:
            lengths = first_lengths if kind == "caption" else rng.integers(low, high, n)
            ids = first_words if kind == "caption" else rng.choice(vocabulary, int(lengths.sum()), p=p)
        else:  # two words of the first caption replaced
            lengths, ids = first_lengths, first_words.copy()
            starts = np.cumsum(first_lengths) - first_lengths
            for _ in range(2):
                ids[starts + rng.integers(0, first_lengths)] = rng.choice(vocabulary, n, p=p)
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        texts.append(pc.binary_join(pa.ListArray.from_arrays(offsets, names.take(pa.array(ids))), " "))
        kinds.append(kind)
    per_image = len(REFERENCES)
    order = pa.array(np.arange(n * per_image).reshape(per_image, n).T.ravel())  # image by image
    text = pa.concat_arrays(texts).take(order)
    kind = pa.array(np.repeat(np.array(kinds, object)[None, :], n, axis=0).ravel(), pa.string())
    rank = pa.array(np.tile(RANKS, n), pa.int32())
    structs = pa.StructArray.from_arrays([kind, rank, text, pa.nulls(len(text), pa.float64())], fields=list(REFERENCE))
    references = pa.ListArray.from_arrays(pa.array(np.arange(0, n * per_image + 1, per_image, dtype=np.int32)), structs)
    return pa.table({"image_id": [f"{i:08d}" for i in range(n)], "caption": texts[0], "references": references})


def nltk_pairs(queries, captions, params: BleuParams) -> tuple[float, list[list[float]]]:
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    smoothing = getattr(SmoothingFunction(), params.smoothing)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = [
            [sentence_bleu([c], q, params.weights, smoothing, params.auto_reweigh) for c in captions] for q in queries
        ]
    return len(queries) * len(captions) / (time.perf_counter() - started), scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--skip-spark", action="store_true")
    args = parser.parse_args()
    params = BleuParams()

    # 1. Exactness and pair throughput on a sample, against nltk.
    sample = corpus(3000, 2000, seed=1)
    sample_queries = corpus(40, 2000, seed=2, short_share=0.25)
    nltk_rate, nltk_scores = nltk_pairs(sample_queries[:4], sample, params)
    ids = [f"{i:07d}" for i in range(len(sample))]
    index = BleuIndex.from_texts(ids, [[c] for c in sample])
    index.search(sample_queries[0], len(sample), params)  # compile the kernels outside the timing
    started = time.perf_counter()
    hits = [index.search(q, len(sample), params) for q in sample_queries]
    engine_rate = len(sample_queries) * len(sample) / (time.perf_counter() - started)
    max_diff = 0.0
    for q, expected in enumerate(nltk_scores):
        got = {hit.image_id: hit.score for hit in hits[q]}
        max_diff = max(max_diff, max(abs(got.get(i, 0.0) - s) for i, s in zip(ids, expected)))

    # 2. The engine alone at scale.
    t0 = time.perf_counter()
    big = images_with_references(args.captions, 20_000, seed=3)
    queries = corpus(args.queries, 20_000, seed=4, short_share=0.25)
    t1 = time.perf_counter()
    big_ids = big.column("image_id").to_pylist()
    big_references = reference_texts(big)
    big_index = build_index(big_ids, big_references)
    t2 = time.perf_counter()
    results = big_index.search_many(queries, 10, params)  # the kernel releases the GIL: every core
    t3 = time.perf_counter()
    one_thread = [big_index.search(q, 10, params) for q in queries]
    one_thread_s = time.perf_counter() - t3
    warm_s, warm_load_s, warm_same = warm_run(big, big_references, big_index, queries, results, params)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    top10_rate = len(big) * len(queries) / (t3 - t2)  # caption-query pairs decided per second
    index_gb = big_index.nbytes / 2**30
    answered = sum(1 for r in results if r)

    spark_s, spark_cold_s, spark_warm_s, spark_same = None, None, None, None
    if not args.skip_spark:
        spark_s, spark_cold_s, spark_warm_s, spark_same = spark_run(big, queries, results)

    print(f"{'stage':<52}{'seconds':>10}")
    print(f"{'generate captions and queries (not counted)':<52}{t1 - t0:>10.2f}")
    print(f"{f'split {len(big_references.texts):,} texts into words, build the index':<52}{t2 - t1:>10.2f}")
    print(f"{f'exact top-10 for {len(queries):,} queries':<52}{t3 - t2:>10.2f}")
    print(f"{'engine total (build + queries)':<52}{t3 - t1:>10.2f}")
    print(f"{'  the same queries on one thread (not counted)':<52}{one_thread_s:>10.2f}")
    print(f"one thread's results equal all cores': {one_thread == results}")
    print(f"{'warm: open the saved index':<52}{warm_load_s:>10.2f}")
    print(f"{'warm engine total (open + queries)':<52}{warm_s:>10.2f}")
    print(f"the saved index's results equal the built one's: {warm_same}")
    if spark_s is not None:
        print(f"{'Spark job, local[*], nothing saved (as before)':<52}{spark_s:>10.2f}")
        print(f"{'Spark job, local[*], cold: shares built and saved':<52}{spark_cold_s:>10.2f}")
        print(f"{'Spark job, local[*], warm: saved shares opened':<52}{spark_warm_s:>10.2f}")
        print(f"Spark job's results (cold and warm) equal the engine's: {spark_same}")
    print(
        f"pairs/s: nltk loop {nltk_rate:,.0f}; engine scoring every pair {engine_rate:,.0f} "
        f"({engine_rate / nltk_rate:,.0f}x); engine exact top-10 at scale {top10_rate:,.0f} "
        f"({top10_rate / nltk_rate:,.0f}x); largest score difference from nltk: {max_diff}"
    )
    print(
        f"index {index_gb:.2f} GB in arrays; process peak {peak_gb:.2f} GB; {answered:,} queries had hits; "
        f"{os.cpu_count()} cores"
    )
    print(
        json.dumps(
            {
                "engine_pairs_per_s": round(top10_rate),
                "engine_all_pairs_per_s": round(engine_rate),
                "nltk_pairs_per_s": round(nltk_rate),
                "speedup": round(top10_rate / nltk_rate),
                "max_abs_diff": max_diff,
                "big_captions": len(big),
                "big_texts": len(big_references.texts),
                "big_queries": len(queries),
                "big_build_s": round(t2 - t1, 2),
                "big_queries_s": round(t3 - t2, 2),
                "big_queries_one_thread_s": round(one_thread_s, 2),
                "big_run_s": round(t3 - t1, 2),
                "big_warm_run_s": round(warm_s, 2),
                "big_warm_load_s": round(warm_load_s, 2),
                "warm_equals_built": warm_same,
                "big_spark_run_s": round(spark_s, 2) if spark_s is not None else None,
                "big_spark_cold_run_s": round(spark_cold_s, 2) if spark_cold_s is not None else None,
                "big_spark_warm_run_s": round(spark_warm_s, 2) if spark_warm_s is not None else None,
                "spark_equals_engine": spark_same,
                "big_peak_rss_gb": round(peak_gb, 2),
                "big_index_gb": round(index_gb, 2),
            }
        )
    )


def warm_run(table: pa.Table, references, engine, queries, expected, params) -> tuple[float, float, bool]:
    """The index saved as search.cache saves it, then opened and asked the queries: (seconds in all, seconds to
    open, same results?)."""
    import tempfile
    from pathlib import Path

    from search import cache
    from search.index import Index

    ids = table.column("image_id").to_pylist()
    shown = table.select(["image_id", "caption"]).append_column("uri", pa.nulls(table.num_rows, pa.string()))
    key = {"bench": "query", "rows": table.num_rows}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "entry"
        cache.save(Index(shown, references, engine, dict(zip(ids, range(len(ids))))), folder, key)
        started = time.perf_counter()
        index = cache.load(folder, key)
        opened = time.perf_counter() - started
        results = index.engine.search_many(queries, 10, params)
        seconds = time.perf_counter() - started
        del index
    return seconds, opened, results == expected


def spark_run(table: pa.Table, queries, expected) -> tuple[float, float, float, bool]:
    """The same search as a Spark job over a Parquet file of the captions, each run in a new session: without a
    state folder (nothing saved, as before), cold (shares built and saved), warm (the saved shares opened);
    (seconds of each, same results every time?)."""
    import tempfile

    import pyarrow.parquet as pq

    from cbir.settings import load_settings
    from jobs.captions import table_captions
    from jobs.search import search
    from jobs.spark import build_session
    from search.index import bleu_params
    from search.queries import Query
    from search.searcher import Rules, bleu_plans

    with tempfile.TemporaryDirectory() as tmp:
        # Row groups of 100,000 rows, as Parquet writers commonly make them.
        pq.write_table(table, f"{tmp}/captions.parquet", row_group_size=100_000)
        settings = load_settings(overrides=[f"lake={tmp}/lake", f"state_dir={tmp}/state"], environ={})
        asked = [Query(f"q{i}", 10, text=" ".join(q)) for i, q in enumerate(queries)]
        runs = []
        for state_dir in (None, settings.state_dir, settings.state_dir):  # nothing saved (as before), cold, warm
            spark = build_session(settings)
            started = time.perf_counter()
            captions = table_captions(spark, f"{tmp}/captions.parquet", settings)
            rules = Rules(bleu_params(settings), KINDS)
            rows = search(spark, captions, bleu_plans(asked), rules, state_dir=state_dir).collect()
            runs.append((time.perf_counter() - started, rows))
            spark.stop()
    same = True
    for _, rows in runs:
        got: dict[str, list] = {}
        for row in sorted(rows, key=lambda r: (r["query_id"], r["rank"])):
            got.setdefault(row["query_id"], []).append((row["image_id"], row["score"]))
        same &= all(got.get(f"q{i}", []) == [(h.image_id, h.score) for h in hits] for i, hits in enumerate(expected))
    return runs[0][0], runs[1][0], runs[2][0], same


if __name__ == "__main__":
    main()
