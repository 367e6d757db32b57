"""Query: BLEU scores equal nltk's, exact top k, the Spark job equals the engine, bad rows, the gallery."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from nltk.translate.bleu_score import SmoothingFunction, closest_ref_length, sentence_bleu

from cbir.bleu import SMOOTHINGS, BleuParams, matches, score
from cbir.engine import BleuIndex
from cbir.lake import Lake
from cbir.references import GENERATED, KINDS, References, build_index, reference_texts
from cbir.schemas import REFERENCES
from cbir.text import words, words_array
from jobs import query
from jobs.captions import table_captions
from jobs.job import run as run_job
from jobs.search import search
from search import gallery
from search.index import bleu_params
from search.queries import Query, read_queries
from search.searcher import Rules, bleu_plans

from conftest import make_settings

WORDS = ["a", "dog", "runs", "on", "the", "grass", "red", "ball", "two", "in"]  # small: overlaps are common
WEIGHTS = [(0.25, 0.25, 0.25, 0.25), (0.5, 0.5), (0.4, 0.3, 0.2, 0.1), (1.0,), (0.1, 0.2, 0.3, 0.2, 0.2)]
sentences = st.lists(st.sampled_from(WORDS), min_size=0, max_size=12)
queries = st.lists(st.sampled_from(WORDS), min_size=1, max_size=9)
params = st.builds(BleuParams, st.sampled_from(WEIGHTS), st.sampled_from(SMOOTHINGS), st.booleans())


def nltk_score(references, hypothesis, p: BleuParams) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sentence_bleu(
            references, hypothesis, p.weights, getattr(SmoothingFunction(), p.smoothing), p.auto_reweigh
        )


def brute_force(ids, texts, hypothesis, k, p: BleuParams) -> list[tuple[str, float]]:
    scored = sorted((-nltk_score(refs, hypothesis, p), image_id) for image_id, refs in zip(ids, texts))
    return [(image_id, -negative) for negative, image_id in scored if negative < 0][:k]


@hsettings(max_examples=400, deadline=None)
@given(st.lists(sentences, min_size=1, max_size=3), queries, params)
def test_scores_equal_nltk_bit_for_bit(references, hypothesis, p):
    ours = score(
        matches(hypothesis, references, p.max_order),
        len(hypothesis),
        closest_ref_length(references, len(hypothesis)),  # nltk's own r
        p,
    )
    assert ours == nltk_score(references, hypothesis, p)


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    st.lists(st.lists(sentences, min_size=1, max_size=3), min_size=1, max_size=60), queries, params, st.integers(1, 12)
)
def test_engine_top_k_equals_nltk_brute_force(texts, hypothesis, p, k):
    ids = [f"img{i:03d}" for i in range(len(texts))][::-1]  # ids not in insertion order
    index = BleuIndex.from_texts(ids, texts, max_order=max(len(w) for w in WEIGHTS))
    assert [(h.image_id, h.score) for h in index.search(hypothesis, k, p)] == brute_force(ids, texts, hypothesis, k, p)


kinds = st.sampled_from(KINDS)
image_texts = st.lists(st.tuples(kinds, sentences), min_size=0, max_size=5)


@hsettings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(image_texts, queries), min_size=1, max_size=12), params)
def test_the_matched_text_of_a_hit_shares_the_most_words_then_scores_best(images, p):
    """References.matched (counted for every image at once) equals the rule read plainly, text by text: the most
    distinct query words shared, then the best BLEU of the text alone, then the first; None: no word shared."""
    texts = pa.array([[" ".join(t) for _, t in refs] for refs, _ in images], pa.list_(pa.string()))
    kinds_ = pa.array([[k for k, _ in refs] for refs, _ in images], pa.list_(pa.string()))
    asked = [query for _, query in images]

    got = References.from_lists(texts, kinds_).matched(asked, p)

    expected = []
    for refs, asked_words in images:
        shared = [len(set(asked_words) & set(text)) for _, text in refs]
        most = max(shared, default=0)
        tied = [i for i, n in enumerate(shared) if n == most and most]
        scores = [
            score(matches(asked_words, [refs[i][1]], p.max_order), len(asked_words), len(refs[i][1]), p) for i in tied
        ]
        best = tied[scores.index(max(scores))] if tied else None
        expected.append(None if best is None else (refs[best][0], " ".join(refs[best][1])))
    assert got == expected


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(image_texts, min_size=1, max_size=30), queries, params, st.lists(kinds, min_size=1, unique=True))
def test_every_reference_of_the_chosen_kinds_counts_as_nltk_counts_it(images, hypothesis, p, chosen):
    """An image's references (stored ones, and its source title, description, tags and given text) are
    nltk's references: the same texts in, the same scores and ranking out."""
    ids = [f"img{i:03d}" for i in range(len(images))]
    stored = [
        [{"kind": kind, "rank": 1, "text": " ".join(text), "score": None} for kind, text in refs if kind in GENERATED]
        for refs in images
    ]
    sources = {
        kind: [" ".join(next((t for k, t in refs if k == kind), [])) or None for refs in images]
        for kind in ("title", "description", "given")
    }
    table = pa.table(
        {
            "image_id": ids,
            "caption": [None] * len(ids),
            "references": pa.array(stored, REFERENCES),
            **sources,
            "tags": [next((t for k, t in refs if k == "tags"), None) for refs in images],
        }
    )
    index = build_index(ids, reference_texts(table, chosen), max_order=max(len(w) for w in WEIGHTS))
    # nltk: the first text of each source kind only (an image has one title), every generated one.
    texts = [
        [
            text
            for i, (kind, text) in enumerate(refs)
            if kind in chosen and text and (kind in GENERATED or kind not in [k for k, _ in refs[:i]])
        ]
        or [[]]
        for refs in images
    ]
    assert [(h.image_id, h.score) for h in index.search(hypothesis, 10, p)] == brute_force(
        ids, texts, hypothesis, 10, p
    )


def zipf_corpus(n: int, seed: int, short: bool = False) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    vocabulary = [f"w{i}" for i in range(300)]
    weights = 1 / np.arange(1, 301) ** 1.1
    weights /= weights.sum()
    lengths = rng.integers(1, 4, n) if short else rng.integers(6, 14, n)
    return [list(rng.choice(vocabulary, size=length, p=weights)) for length in lengths]


@hsettings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.none(),
            st.text(),
            st.lists(
                st.sampled_from(
                    ["startseq", "endseq", "A", "dog's", "snake_case", "x\x00y", "tab\there", "Émile", "ﬁne", "", "1,5"]
                )
            ).map(" ".join),
        )
    )
)
def test_words_of_a_column_equal_words_of_each_text(texts):
    assert words_array(texts).to_pylist() == [words(t) for t in texts]


def test_exact_top_10_over_two_thousand_captions():
    captions = zipf_corpus(2000, seed=1)
    ids = [f"{i:05d}" for i in range(len(captions))]
    index = BleuIndex.from_texts(ids, [[c] for c in captions])
    asked = zipf_corpus(12, seed=2) + zipf_corpus(6, seed=3, short=True) + [["w0"], ["w0", "w0", "w1"]]
    for p in (BleuParams(), BleuParams(smoothing="method0", auto_reweigh=False)):
        for hypothesis in asked:
            got = [(h.image_id, h.score) for h in index.search(hypothesis, 10, p)]
            assert got == brute_force(ids, [[c] for c in captions], hypothesis, 10, p), (hypothesis, p)


def test_a_huge_vocabulary_renumbers_long_grams_and_stays_exact():
    # 48,000 distinct words: 3-gram codes times the vocabulary would pass 2**62, so the index
    # renumbers them before building 4-grams, and queries must do the same.
    vocabulary = [f"w{i}" for i in range(48_000)]
    captions = [vocabulary[at : at + 24] for at in range(0, len(vocabulary), 24)]
    ids = [f"{i:05d}" for i in range(len(captions))][::-1]
    index = BleuIndex.from_texts(ids, [[c] for c in captions])
    assert index.renumbered.any()
    asked = [captions[-1][3:12], captions[1500][:5] + captions[7][:6], ["w47999", "w0", "w1", "w2", "w3"]]
    for hypothesis in asked:
        got = [(h.image_id, h.score) for h in index.search(hypothesis, 5, BleuParams())]
        assert got == brute_force(ids, [[c] for c in captions], hypothesis, 5, BleuParams()), hypothesis
        assert got, hypothesis
    assert index.search(asked[0], 1, BleuParams())[0].image_id == ids[-1]  # found through its 4-grams


def test_many_queries_at_once_equal_one_at_a_time():
    captions = zipf_corpus(3000, seed=5)
    index = BleuIndex.from_texts([f"{i:05d}" for i in range(len(captions))], [[c] for c in captions])
    asked = zipf_corpus(40, seed=6) + zipf_corpus(20, seed=7, short=True)
    assert index.search_many(asked, 10, BleuParams(), threads=3) == [index.search(q, 10, BleuParams()) for q in asked]


def test_unknown_words_and_empty_queries_have_no_hits():
    index = BleuIndex.from_captions(["a", "b"], ["Red ball!", "blue sky"])
    assert index.search(["zebra"], 5, BleuParams()) == []
    assert index.search([], 5, BleuParams()) == []
    assert [h.image_id for h in index.search(["zebra", "red"], 5, BleuParams())] == ["a"]


def captions_parquet(path: Path, captions: list[list[str]]) -> list[str]:
    ids = [f"{i:06d}" for i in range(len(captions))]
    pq.write_table(
        pa.table(
            {"image_id": ids, "caption": [" ".join(c) for c in captions], "uri": [f"/nowhere/{i}.jpg" for i in ids]}
        ),
        path,
    )
    return ids


def test_the_spark_job_equals_the_engine(spark, tmp_path):
    captions = zipf_corpus(2000, seed=4)
    ids = captions_parquet(tmp_path / "captions.parquet", captions)
    settings = make_settings(tmp_path)
    table = table_captions(spark, str(tmp_path / "captions.parquet"), settings)
    asked = [Query(f"q{i}", k=7, text=" ".join(q)) for i, q in enumerate(zipf_corpus(15, 5) + zipf_corpus(5, 6, True))]
    params = bleu_params(settings)

    rows = search(spark, table, bleu_plans(asked), Rules(params, ("caption",)), partitions=3).collect()

    index = BleuIndex.from_texts(ids, [[c] for c in captions])
    for q in asked:
        expected = [(h.image_id, h.score) for h in index.search(q.words, q.k, params)]
        got = sorted((r["rank"], r["image_id"], r["score"]) for r in rows if r["query_id"] == q.query_id)
        assert [(image_id, s) for _, image_id, s in got] == expected
        assert [rank for rank, _, _ in got] == list(range(1, len(expected) + 1))


def test_bad_query_rows_land_in_the_errors_table(spark, tmp_path):
    captions = [["a", "red", "ball", "on", "the", "grass"], ["two", "dogs", "in", "the", "water"]]
    captions_parquet(tmp_path / "captions.parquet", captions)
    (tmp_path / "queries.csv").write_text(
        "query_id,text,image,k\n"
        "good,a red ball,,\n"
        "narrow,the water,,1\n"
        ",orphan text,,\n"
        "nothing,,,\n"
        "both,a dog,dog.jpg,\n"
        "badk,a dog,,zero\n"
        "bigk,a dog,,5000\n"
        "empty,!!! ...,,\n"
        "unknown,zebra unicorn,,\n"
        "good,again,,\n"
        "picture,,no-such.jpg,\n"
    )
    settings = make_settings(tmp_path)
    summary = run_job(
        query.QueryJob(
            Lake.open(settings),
            settings,
            str(tmp_path / "queries.csv"),
            captions_table=str(tmp_path / "captions.parquet"),
        ),
        spark,
    )

    results, errors = Lake.open(settings).query_tables(summary.run_id)
    reasons = {row["query_id"]: row["reason"] for row in errors.read().to_pylist()}
    assert all(row["error"].startswith(row["reason"] + ": ") for row in errors.read().to_pylist())
    # The lake has no captioner: the text rows are answered from the table, the image row is an error.
    assert reasons == {
        "#row=3": "bad-row",
        "nothing": "bad-row",
        "both": "bad-row",
        "badk": "bad-k",
        "bigk": "bad-k",
        "empty": "empty-text",
        "unknown": "no-match",
        "good": "duplicate-id",
        "picture": "no-captioner",
    }
    rows = results.read().to_pylist()
    assert sorted((r["query_id"], r["rank"]) for r in rows) == [("good", 1), ("narrow", 1)]
    good = [r for r in rows if r["query_id"] == "good" and r["rank"] == 1][0]
    assert good["caption"] == "a red ball on the grass" and good["uri"] == "/nowhere/000000.jpg"
    assert good["score"] == nltk_score([captions[0]], ["a", "red", "ball"], bleu_params(settings))
    assert (summary.queries, summary.answered, summary.results) == (11, 2, 2)


def test_an_unreadable_query_file_is_one_clear_error(tmp_path, local_settings):
    from cbir.errors import UsageError

    (tmp_path / "q.csv").write_text("id,text\n1,a dog\n")
    with pytest.raises(UsageError, match="query file .* has no 'query_id' column"):
        read_queries(str(tmp_path / "q.csv"), local_settings)
    (tmp_path / "q.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(UsageError, match="q.parquet cannot be read"):
        read_queries(str(tmp_path / "q.parquet"), local_settings)


def test_the_gallery_escapes_every_text(local_settings):
    lake = Lake.open(local_settings)
    lake.check()
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    asked = [Query(evil, 3, text=f"dogs {evil}")]
    rows = [
        {
            "query_id": evil,
            "rank": 1,
            "image_id": "ab" * 32,
            "uri": "/x.jpg",
            "caption": evil,
            "score": 0.5,
            "query_caption": None,
            "likeness": None,
        }
    ]
    page = gallery.render(lake, local_settings, f"run {evil}", rows, asked, [(evil, f"bad-row: {evil}")], 10)
    assert "<script>" not in page and "onerror=alert(1)>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page


def test_cbir_query_prints_its_run_folder_last_and_reports_to_the_server(
    spark, prefect_server, tmp_path, monkeypatch, capsys
):
    from cli.main import main

    from conftest import flow_runs

    captions_parquet(tmp_path / "captions.parquet", [["a", "cat", "on", "a", "mat"], ["a", "dog", "on", "a", "log"]])
    with open(tmp_path / "q.jsonl", "w") as handle:
        handle.write(json.dumps({"query_id": "cat", "text": "a cat", "k": 1}) + "\n")
    before = len(flow_runs("query"))
    monkeypatch.chdir(tmp_path)  # the embedded default lake, .cbir/lake, is the working folder's
    # In this process (its Spark session, the test server); the CLI as a process is tested with `cbir demo`.
    environ = dict(os.environ)
    try:
        assert main(["query", str(tmp_path / "q.jsonl"), "--captions", str(tmp_path / "captions.parquet")]) == 0
    finally:  # the CLI sets its process's PREFECT_HOME, KERAS_HOME, ...
        os.environ.clear()
        os.environ.update(environ)
    assert len(flow_runs("query")) == before + 1  # the run is on the server PREFECT_API_URL names
    run_folder = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert run_folder.parent == tmp_path / ".cbir" / "lake" / "queries"
    assert (run_folder / "gallery.html").is_file()
    rows = ds.dataset(str(run_folder / "results"), format="parquet").to_table().to_pylist()
    assert [(r["query_id"], r["rank"], r["caption"]) for r in rows] == [("cat", 1, "a cat on a mat")]


def test_recall_and_average_precision():
    from jobs.evaluate import average_precision_at, recall_at

    assert recall_at([1, 3, None, 10, 11], 1) == 0.2
    assert recall_at([1, 3, None, 10, 11], 10) == 0.6
    # Relevant at ranks 1 and 3 of 10, 4 relevant in all: (1/1 + 2/3) / 4.
    assert average_precision_at([True, False, True] + [False] * 7, 4) == pytest.approx((1 + 2 / 3) / 4)
    assert average_precision_at([True] * 12, 12) == 1.0  # only the top 10 count, over min(12, 10)
    assert average_precision_at([False] * 10, 3) == 0.0 and average_precision_at([], 0) == 0.0
