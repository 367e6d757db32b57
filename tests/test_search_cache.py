"""The search index cache (search/cache.py): a second search loads what the first built, answers
exactly alike, and any change of what the index depends on (a new index run, another captioner
version, other reference kinds, another format) builds a new one; a damaged entry is built again."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from test_query import WEIGHTS, brute_force, params, queries, sentences

from bench.query import corpus
from bench.web import VERSION, write_lake
from cbir.lake import Lake
from cbir.schemas import REFERENCES
from cbir.text import words
from search import cache as index_cache
from search.cache import FOLDER, cached_index, digest, index_key
from search.index import Index, bleu_params, version_captions
from search.searcher import Plan, Rules, Searcher, search_one

from conftest import make_settings

N = 400
KINDS = ("caption", "label", "neighbour", "title", "tags")


@pytest.fixture
def lake_root(tmp_path):
    write_lake(tmp_path, N)
    return tmp_path


@pytest.fixture
def settings(lake_root):
    return make_settings(lake_root)


@pytest.fixture
def stats(monkeypatch):
    counter = index_cache.STATS.__class__()
    monkeypatch.setattr(index_cache, "STATS", counter)
    return counter


def entries(settings) -> list[Path]:
    root = Path(settings.state_dir) / FOLDER
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


def cached(settings, kinds=KINDS, version=VERSION, extra=()):
    return cached_index(Lake.open(settings), settings.state_dir, version, kinds, 4, extra)


def test_a_second_search_loads_the_cache_and_finds_the_same(settings, stats):
    lake = Lake.open(settings)
    first = search_one(lake, settings, 10, text="w1 w2 w30 w5")[1]
    assert dict(stats) == {"built": 1, "saved": 1}
    assert len(entries(settings)) == 1
    second = search_one(lake, settings, 10, text="w1 w2 w30 w5")[1]
    assert stats["loaded"] == 1 and stats["built"] == 1
    assert first == second and len(first) == 10


def top(index: Index, query: list[str], k: int, params) -> list[dict]:
    """The top k by BLEU, as cbir search shows them."""
    return Searcher(index, Rules(params, KINDS)).search(Plan("q", query, k))


def test_a_loaded_index_answers_exactly_as_a_built_one(settings, stats):
    lake, params = Lake.open(settings), bleu_params(settings)
    built = Index.build(version_captions(lake, VERSION, KINDS), KINDS, 4)
    cached(settings)
    loaded = cached(settings)
    assert stats["loaded"] == 1
    assert loaded.table.equals(built.table) and loaded.row_of == built.row_of
    assert list(loaded.engine.image_ids) == built.engine.image_ids  # a view of the table's ids, in engine order
    assert loaded.engine.vocabulary == built.engine.vocabulary
    for name, array in built.engine.state()[0].items():
        np.testing.assert_array_equal(getattr(loaded.engine, name), array)
    queries = corpus(300, 20_000, seed=7, short_share=0.25)
    queries += [q[:2] + ["not-a-word"] for q in queries[:20]]
    for query in queries:
        assert top(loaded, query, 10, params) == top(built, query, 10, params), query
    assert sum(bool(top(built, q, 10, params)) for q in queries) > 250


def test_a_new_index_run_another_version_or_other_kinds_build_a_new_index(lake_root, settings, stats):
    cached(settings)
    cached(settings)
    assert stats["built"] == 1 and stats["loaded"] == 1
    cached(settings, kinds=("caption", "label"))  # other kinds
    assert stats["built"] == 2
    cached(settings, version="20270101T000000Z-0000beec")  # another captioner version (it indexed nothing)
    assert stats["built"] == 3
    write_lake(lake_root, N)  # another index run of the same images
    index = cached(settings)
    assert stats["built"] == 4 and len(index) == N
    cached(settings)
    assert stats["loaded"] == 2


def test_the_manifest_counts_only_when_source_texts_or_its_columns_are_read(settings):
    lake = Lake.open(settings)
    assert set(index_key(lake, VERSION, ("caption", "label"), 4)["tables"]) == {"captions"}
    assert set(index_key(lake, VERSION, ("caption", "title"), 4)["tables"]) == {"captions", "manifest"}
    assert set(index_key(lake, VERSION, ("caption",), 4, ("format",))["tables"]) == {"captions", "manifest"}


def test_another_format_version_is_another_key(settings, monkeypatch):
    key = index_key(Lake.open(settings), VERSION, KINDS, 4)
    monkeypatch.setattr(index_cache, "FORMAT", index_cache.FORMAT + 1)
    assert digest(index_key(Lake.open(settings), VERSION, KINDS, 4)) != digest(key)


@pytest.mark.parametrize(
    "damage",
    ["truncate post_images.npy", "drop meta.npy", "garble table.arrow", "shape codes.npy", "another key in meta.json"],
)
def test_a_damaged_entry_is_built_again_with_one_line(settings, stats, caplog, damage):
    params = bleu_params(settings)
    expected = top(cached(settings), ["w1", "w2", "w30"], 10, params)
    (folder,) = entries(settings)
    what, name = damage.split(" ", 1)[0], damage.split(" ")[1]
    path = folder / name
    if what == "truncate":
        path.write_bytes(path.read_bytes()[:-40])
    elif what == "drop":
        path.unlink()
    elif what == "garble":
        path.write_bytes(b"not arrow" + path.read_bytes()[100:])
    elif what == "shape":
        np.save(path, np.load(path)[:-1])
    else:
        meta = json.loads((folder / "meta.json").read_text())
        meta["key"]["format"] = -1
        (folder / "meta.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="cbir.search"):
        again = cached(settings)
    lines = [r for r in caplog.records if r.name == "cbir.search"]
    assert len(lines) == 1 and "does not load" in lines[0].getMessage() and "building it again" in lines[0].getMessage()
    assert stats["discarded"] == 1 and stats["built"] == 2
    assert top(again, ["w1", "w2", "w30"], 10, params) == expected
    cached(settings)  # the rebuilt entry loads
    assert stats["loaded"] == 1


def test_only_the_newest_entries_of_a_lake_stay(settings, stats):
    kinds = [("caption",), ("label",), ("neighbour",), ("title",), ("tags",)]
    for chosen in kinds:
        cached(settings, kinds=chosen)
    assert len(entries(settings)) == index_cache.KEEP
    cached(settings, kinds=("tags",))
    assert stats["loaded"] == 1
    cached(settings, kinds=("caption",))
    assert stats["built"] == len(kinds) + 1
    assert not [p for p in (Path(settings.state_dir) / FOLDER).iterdir() if p.name.startswith(".tmp-")]


def test_cbir_search_twice_loads_the_saved_index(lake_root):
    """The command itself: the first run saves the index, the second loads it (its log line says so)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CBIR_")}
    command = [
        sys.executable,
        "-c",
        "import logging, sys; logging.basicConfig(level=logging.INFO); from cli.main import main; sys.exit(main())",
        "search",
        "w1 w2 w30",
        "--set",
        f"lake={lake_root}/lake",
        "--set",
        f"state_dir={lake_root}/state",
    ]
    runs = [subprocess.run(command, env=environ, capture_output=True, text=True, timeout=300) for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr[-2000:]
    assert runs[0].stdout == runs[1].stdout and "top 10" in runs[0].stdout
    assert "search index built" in runs[0].stderr and "search index loaded" in runs[1].stderr
    assert words(runs[0].stdout)


@hsettings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    st.lists(st.lists(sentences, min_size=1, max_size=3), min_size=1, max_size=40), queries, params, st.integers(1, 12)
)
def test_a_saved_and_loaded_index_equals_nltk_brute_force(tmp_path_factory, texts, hypothesis, p, k):
    """Saved and loaded again, the engine still ranks and scores as nltk's loop does, to the last bit."""
    ids = [f"img{i:03d}" for i in range(len(texts))][::-1]
    table = pa.table(
        {
            "image_id": ids,
            "uri": [None] * len(ids),
            "caption": [" ".join(refs[0]) for refs in texts],
            "references": pa.array(
                [
                    [{"kind": "caption", "rank": r, "text": " ".join(t), "score": None} for r, t in enumerate(refs)]
                    for refs in texts
                ],
                REFERENCES,
            ),
        }
    )
    built = Index.build(table, ("caption",), max(len(w) for w in WEIGHTS))
    key = {"format": index_cache.FORMAT, "test": True}
    folder = tmp_path_factory.mktemp("entry") / "x"
    index_cache.save(built, folder, key)
    loaded = index_cache.load(folder, key)
    got = [(h.image_id, h.score) for h in loaded.engine.search(hypothesis, k, p)]
    nonempty = [[t for t in refs if t] or [[]] for refs in texts]
    assert got == [(h.image_id, h.score) for h in built.engine.search(hypothesis, k, p)]
    assert got == brute_force(ids, nonempty, hypothesis, k, p)
    assert top(loaded, hypothesis, k, p) == top(built, hypothesis, k, p)


def test_cbir_web_loads_the_saved_index_and_rebuilds_when_a_run_is_committed(lake_root, settings, stats):
    from web.library import Library

    first = Library(settings)
    assert stats["built"] == 1
    second = Library(settings)  # a restart: the same lake state
    assert stats["loaded"] == 1 and stats["built"] == 1
    assert second.search("w1 w2 w30", 10).results == first.search("w1 w2 w30", 10).results
    assert second.snapshot.searcher.index.table.column_names == ["image_id", "uri", "caption", "format"]
    write_lake(lake_root, N)  # a new index run: the next reload must not find the old index
    assert second.reload()
    assert stats["built"] == 2 and second.snapshot.marker != first.snapshot.marker


def test_cbir_search_prints_no_matched_text_for_an_image_found_by_likeness_alone(lake_root, capsys):
    """The query 'w5000' matches two images' texts; the query's picture ranks eight more by likeness alone: they show
    their caption and score, and an empty matched column (not 'None: None')."""
    from cli.main import main

    assert main(["search", "w5000", "--set", f"lake={lake_root}/lake", "--set", f"state_dir={lake_root}/state"]) == 0
    out = capsys.readouterr().out
    ranked = [line.split("│")[1:-1] for line in out.splitlines() if line.split("│")[1:2] != [" " * 6]]
    ranked = [[cell.strip() for cell in cells] for cells in ranked if len(cells) == 5]  # rank, score, matched, ...
    assert [cells[0] for cells in ranked] == [str(rank) for rank in range(1, 11)]
    assert all(cells[2].split(":")[0] in ("caption", "title") for cells in ranked[:2])
    assert all(cells[2] == "" and cells[3] and float(cells[1]) > 0 for cells in ranked[2:])
    assert "None" not in out  # neither 'None: None' nor a missing uri


# The query job's shares: each Spark task opens its share of the captions saved by the first run.
QUERIES = ["w1 w2 w30 w5", "w5000", "w7 w3", "w12 w40 w2 w9 w1"]


def query_run(spark, settings, tmp: Path) -> dict[str, list[tuple]]:
    """Run the query job on QUERIES: query_id -> its (rank, image_id, score)."""
    from jobs import query
    from jobs.job import run as run_job

    (tmp / "queries.csv").write_text("query_id,text\n" + "".join(f"q{i},{t}\n" for i, t in enumerate(QUERIES)))
    summary = run_job(query.QueryJob(Lake.open(settings), settings, str(tmp / "queries.csv")), spark)
    results = Lake.open(settings).query_tables(summary.run_id)[0].read().to_pylist()
    found: dict[str, list[tuple]] = {}
    for row in sorted(results, key=lambda row: (row["query_id"], row["rank"])):
        found.setdefault(row["query_id"], []).append((row["rank"], row["image_id"], row["score"]))
    return found


def shares(settings) -> list[Path]:
    root = Path(settings.state_dir) / FOLDER / index_cache.SHARES
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


@pytest.fixture
def shared(lake_root):
    return make_settings(lake_root, "spark.partitions=3")


def test_the_query_job_opens_the_shares_the_first_run_saved_and_builds_a_damaged_or_stale_one_again(
    spark, lake_root, shared, stats, caplog
):
    """One lake, four query runs (each a Spark job): saved, opened, one share damaged, a new index run."""
    first = query_run(spark, shared, lake_root)
    assert stats["shares built"] == 3 and not stats["shares opened"] and len(shares(shared)) == 3
    second = query_run(spark, shared, lake_root)
    assert stats["shares opened"] == 3 and stats["shares built"] == 3  # no share built again
    assert first == second and len(first) == len(QUERIES)
    lake = Lake.open(shared)
    for i, text in enumerate(QUERIES):  # as cbir search ranks over the whole index
        alone = search_one(lake, shared, 10, text=text)[1]
        assert first[f"q{i}"] == [(hit["rank"], hit["image_id"], hit["score"]) for hit in alone], text
    # Every image is in one share: the images that hash to it.
    tables = [index_cache._read_arrow(share / "table.arrow") for share in shares(shared)]
    ids = [image_id for table in tables for image_id in table.column("image_id").to_pylist()]
    assert sorted(ids) == sorted(version_captions(lake, VERSION, ()).column("image_id").to_pylist())

    # A damaged share: one warning, built again, the same answers.
    damaged = shares(shared)[1] / "post_images.npy"
    damaged.write_bytes(damaged.read_bytes()[:-40])
    with caplog.at_level(logging.WARNING, logger="cbir.search"):
        again = query_run(spark, shared, lake_root)
    lines = [r.getMessage() for r in caplog.records if r.name == "cbir.search"]
    assert len(lines) == 1 and "does not load" in lines[0] and "building it again" in lines[0], lines
    assert (stats["shares opened"], stats["shares built"], stats["shares discarded"]) == (5, 4, 1)
    assert again == first

    # Another index run of the same images: another lake state, new shares.
    write_lake(lake_root, N)
    assert query_run(spark, shared, lake_root) == first
    assert (stats["shares opened"], stats["shares built"]) == (5, 7)
    assert len(shares(shared)) == 6
