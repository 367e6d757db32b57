"""Queries capped in words wherever they come from, and text from outside printed without terminal
control sequences."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from cbir.errors import UsageError
from cbir.lake import Lake
from cbir.text import render_table
from cli import main as cli
from search.queries import read_queries
from web.app import create_app

from conftest import make_settings

LONG = " ".join(f"word{i}" for i in range(101))  # query.max_words is 100


def test_a_query_file_row_over_the_word_cap_is_an_error_row(tmp_path):
    (tmp_path / "q.csv").write_text(f"query_id,text\nshort,a dog\nlong,{LONG}\n")
    queries, errors = read_queries(str(tmp_path / "q.csv"), make_settings(tmp_path))
    assert [q.query_id for q in queries] == ["short"]
    assert errors == [("long", "too-long: the text has 101 words, over query.max_words=100")]


def test_cbir_search_refuses_a_query_over_the_word_cap(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    assert cli.main(["search", LONG]) == 2
    err = capsys.readouterr().err
    assert "cbir: error: the query is too long: the text has 101 words, over query.max_words=100" in err


def test_cbir_web_refuses_a_query_over_the_word_cap(tmp_path):
    settings = make_settings(tmp_path, "query.max_words=5")
    Lake.open(settings).check()
    with TestClient(create_app(settings, warm_up=False), base_url="http://127.0.0.1") as client:
        response = client.get("/api/search", params={"q": "one two three four five six"})
    assert response.status_code == 400 and response.json()["reason"] == "too-long"


@pytest.mark.parametrize("hostile", ["\x1b[2J", "\x1b]52;c;ZWNobw==\x07", "\x9b31m", "a\rb", "\u202eevil", "x\ny"])
def test_printed_tables_carry_no_terminal_control_sequences(hostile):
    text = render_table(
        f"top 1 for {hostile}", [{"rank": 1, "uri": f"http://example.com/{hostile}.jpg", "caption": hostile}]
    )
    assert not any(ch in text for ch in "\x1b\x07\x9b\r\u202e") and "example.com/" in text
    assert text.count("\n") == 6  # title, 3 border lines, header, one row: nothing split a line


def test_error_lines_carry_no_terminal_control_sequences(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    assert cli.main(["ingest", "/no/such/\x1b]0;pwned\x07folder"]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err and "cbir: error: source /no/such/" in err


def test_a_query_file_over_the_byte_cap_once_decompressed_is_refused_before_it_is_read(tmp_path):
    import gzip
    import json
    import tracemalloc

    bomb = tmp_path / "q.jsonl.gz"  # about 10 KB that decompresses to one 10 MB query
    with gzip.open(bomb, "wt", compresslevel=9) as handle:
        handle.write(json.dumps({"query_id": "bomb", "text": "a " * 5_000_000}) + "\n")
    settings = make_settings(tmp_path, "query.max_file_bytes=1000000")
    tracemalloc.start()
    try:
        with pytest.raises(UsageError) as refused:
            read_queries(str(bomb), settings)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(refused.value) == f"query file {bomb} is over query.max_file_bytes=1000000 bytes (decompressed)"
    assert peak < 4_000_000  # read in chunks: the cap, not the 10 MB, bounds what was held


def test_a_parquet_query_file_over_the_byte_cap_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"query_id": ["big"], "text": ["a " * 600_000]}), tmp_path / "q.parquet")
    with pytest.raises(UsageError, match=r"q.parquet is over query.max_file_bytes=1000000 bytes"):
        read_queries(str(tmp_path / "q.parquet"), make_settings(tmp_path, "query.max_file_bytes=1000000"))


def test_a_query_file_over_the_row_cap_is_refused(tmp_path):
    (tmp_path / "q.csv").write_text("query_id,text\n" + "".join(f"q{i},a dog\n" for i in range(11)))
    with pytest.raises(UsageError) as refused:
        read_queries(str(tmp_path / "q.csv"), make_settings(tmp_path, "query.max_rows=10"))
    assert str(refused.value) == f"query file {tmp_path / 'q.csv'} has more than query.max_rows=10 rows"
    queries, errors = read_queries(str(tmp_path / "q.csv"), make_settings(tmp_path, "query.max_rows=11"))
    assert len(queries) == 11 and errors == []


def test_a_query_of_one_very_long_word_is_over_the_length_cap(tmp_path):
    (tmp_path / "q.jsonl").write_text('{"query_id": "long", "text": "%s"}\n' % ("a" * 5001))  # one word
    queries, errors = read_queries(str(tmp_path / "q.jsonl"), make_settings(tmp_path))
    assert queries == []
    assert errors == [("long", "too-long: the text has 5001 characters, over 5000 (query.max_words=100 x 50)")]


def test_cbir_info_prints_lake_folder_names_without_control_characters(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    (tmp_path / ".cbir" / "lake" / "features" / "vgg16\x1b]0;pwned\x07\x1b[2J\u202e").mkdir(parents=True)
    for args in (["info"], ["info", "--json"]):
        assert cli.main(args) == 0
        out = capsys.readouterr().out
        assert not any(ch in out for ch in "\x1b\x07\u202e") and "vgg16" in out
