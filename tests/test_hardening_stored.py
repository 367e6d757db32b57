"""Stored state is not trusted: a search index entry whose values are out of range (the engine's kernels index
without bounds checks) is refused when opened and built again, with one warning, never run; a captioner memory
(memory.npz) that declares more than it holds, or would inflate past its limit, is refused with one line before
anything is inflated or allocated."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import struct
import subprocess
import sys
import time
import tracemalloc
import zipfile
import zlib

import numpy as np
import pyarrow as pa
import pytest

from bench.web import write_lake
from cbir.bleu import BleuParams
from cbir.errors import UsageError
from cbir.lake import Lake
from cbir.schemas import REFERENCES
from models import store
from models.card import EncoderInfo, ModelCard
from models.neighbours import Memory
from search import cache as index_cache
from search.index import Index
from search.pictures import load_pictures
from search.searcher import Plan, Rules, Searcher

from conftest import make_settings

TEXTS = [
    ["a red ball on the grass", "a ball"],
    ["two dogs in the water"],
    ["a red kite over the sea", "kite", "a red kite"],
    ["a dog with a red ball"],
    [""],
]
KEY = {"format": index_cache.FORMAT, "max_order": 4, "test": True}


def small_index() -> Index:
    ids = [f"img{i}" for i in range(len(TEXTS))]
    references = [
        [{"kind": "caption", "rank": r, "text": t, "score": None} for r, t in enumerate(refs)] for refs in TEXTS
    ]
    table = pa.table(
        {
            "image_id": ids,
            "uri": [f"file:///{i}.jpg" for i in ids],
            "caption": [refs[0] for refs in TEXTS],
            "references": pa.array(references, REFERENCES),
        }
    )
    return Index.build(table, ("caption",), 4)


def edit(path, change) -> None:
    array = np.load(path)
    change(array)
    np.save(path, array)


def put(at, value):
    """A change to an array: one value set (value may be a function of the array)."""

    def change(array):
        array[at] = value(array) if callable(value) else value

    return change


def take_texts(array):  # the first image's references given to the second: their sum stays the same
    array[1] += array[0]
    array[0] = 0


# (file, change, what the refusal says). Each keeps the arrays' dtypes and shapes (what was checked before).
TAMPERS = {
    "an image past the end": ("post_images.npy", put(0, 1 << 30), "post_images holds 1073741824, outside 0..4"),
    "a negative image": ("post_images.npy", put(-1, -3), "post_images holds -3"),
    "a list past the postings": ("post_offsets.npy", put(1, lambda a: a[-1] + 1000), "post_offsets does not rise"),
    "a gram without postings": ("post_offsets.npy", put(2, lambda a: a[1]), "post_offsets does not rise at 2"),
    "an order past the codes": ("code_offsets.npy", put(1, lambda a: a[-1] + 7), "code_offsets falls at 2"),
    "grams past fwd_gids": ("meta.npy", put((1, 0), 1 << 40), "meta[:, 0] (the grams' offsets) falls at 2"),
    "texts before ref_lens": ("meta.npy", put((2, 3), -5), "meta[:, 3] (the texts' offsets) does not rise at 2"),
    "id_rank not a permutation": ("meta.npy", put((0, 1), lambda a: a[1, 1]), "meta[:, 1] is not id_rank"),
    "codes not the vocabulary's": ("codes.npy", put(0, 99), "the single words' are not the vocabulary's 15 ids"),
    "a row past the table": ("engine_rows.npy", put(0, len(TEXTS)), "engine_rows.npy is not a permutation"),
    "an image twice": ("engine_rows.npy", put(0, lambda a: a[1]), "engine_rows.npy is not a permutation"),
    "an image without references": ("counts.npy", take_texts, "an image without references"),
}


@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_an_entry_with_values_out_of_range_is_refused_when_opened(tmp_path, tamper):
    built = small_index()
    folder = tmp_path / "entry"
    index_cache.save(built, folder, KEY)
    index_cache.load(folder, KEY)  # untouched, it opens
    name, change, says = TAMPERS[tamper]
    edit(folder / name, change)
    with pytest.raises(ValueError, match=re.escape(says)):
        index_cache.load(folder, KEY)


def test_a_loaded_entry_answers_as_the_built_index(tmp_path):
    built = small_index()
    index_cache.save(built, tmp_path / "entry", KEY)
    loaded = index_cache.load(tmp_path / "entry", KEY)
    rules = Rules(BleuParams(), ("caption",))
    for query in (["a", "red", "ball"], ["kite"], ["dogs", "in", "the", "water"], ["zebra"]):
        assert Searcher(loaded, rules).search(Plan("q", query, 5)) == Searcher(built, rules).search(Plan("q", query, 5))
    assert list(loaded.engine.image_ids) == built.engine.image_ids


def test_cbir_search_rebuilds_an_index_that_would_crash_it_with_one_warning(tmp_path, capsys):
    """The front door: a saved index whose postings name an image far past the end segfaulted every
    `cbir search` until the cache was deleted; now the search warns once, rebuilds, and answers as before."""
    from cli.main import main

    write_lake(tmp_path, 200)
    where = ["--set", f"lake={tmp_path}/lake", "--set", f"state_dir={tmp_path}/state"]
    assert main(["search", "w1 w2 w30", *where]) == 0  # builds and saves the index
    expected = capsys.readouterr().out
    assert "top 10" in expected
    (folder,) = [p for p in (tmp_path / "state" / index_cache.FOLDER).iterdir() if not p.name.startswith(".")]
    edit(folder / "post_images.npy", put(slice(None), 1 << 30))

    environ = {k: v for k, v in os.environ.items() if not k.startswith("CBIR_")}
    command = [sys.executable, "-c", "import sys; from cli.main import main; sys.exit(main())", "search", "w1 w2 w30"]
    run = subprocess.run([*command, *where], env=environ, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.returncode, run.stderr[-2000:])  # -11 (SIGSEGV) before
    assert run.stdout == expected
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert (
        "does not load" in lines[0] and "post_images holds 1073741824" in lines[0] and "building it again" in lines[0]
    )
    meta = json.loads((folder / "meta.json").read_text())
    index_cache.load(folder, meta["key"])  # the rebuilt entry took its place and opens


# memory.npz
FEATURES = 4


def npy(dtype: str, shape: tuple, data: bytes = b"") -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": dtype, "fortran_order": False, "shape": shape})
    return out.getvalue() + data


def zip_of(members: dict[str, tuple[bytes, int, int, int]]) -> bytes:
    """A zip of (stored or deflated bytes, method, crc, inflated size) members, written by hand: a deflate
    stream is given whole, as a bomb is, and zipfile would inflate it to write it."""
    out, central = io.BytesIO(), io.BytesIO()
    for name, (data, method, crc, size) in members.items():
        at, encoded = out.tell(), name.encode()
        out.write(
            struct.pack("<4s2B4HL2L2H", b"PK\x03\x04", 20, 0, 0, method, 0, 33, crc, len(data), size, len(name), 0)
        )
        out.write(encoded + data)
        central.write(
            struct.pack(
                "<4s4B4HL2L5HLL",
                b"PK\x01\x02",
                20,
                0,
                20,
                0,
                0,
                method,
                0,
                33,
                crc,
                len(data),
                size,
                len(name),
                0,
                0,
                0,
                0,
                0,
                at,
            )
        )
        central.write(encoded)
    start = out.tell()
    out.write(central.getvalue())
    out.write(
        struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members), len(central.getvalue()), start, 0)
    )
    return out.getvalue()


def stored(data: bytes) -> tuple[bytes, int, int, int]:
    return data, zipfile.ZIP_STORED, zlib.crc32(data), len(data)


def fitting(rows: int = 4, d: int = 2) -> dict:
    """The small arrays of a memory that fits FEATURES features."""
    return {
        "mean.npy": stored(npy("<f4", (FEATURES,), bytes(4 * FEATURES))),
        "basis.npy": stored(npy("<f4", (FEATURES, d), bytes(4 * FEATURES * d))),
        "vectors.npy": stored(npy("<f2", (rows, d), bytes(2 * rows * d))),
    }


@pytest.fixture
def lake_with_version(tmp_path):
    lake = Lake.open(make_settings(tmp_path))
    lake.check()
    version = "20260101T000000Z-0123abcd"
    folder = tmp_path / "lake" / "models" / "captioner" / version
    folder.mkdir(parents=True)
    info = ModelCard(
        version=version,
        encoder=EncoderInfo(name="vgg16", weights="random", key="vgg16-random", feature_dim=FEATURES),
    )
    return lake, info, folder / "memory.npz"


def refused(lake, info) -> tuple[str, float, int]:
    """The one-line error load_memory gives, its seconds and the peak bytes Python allocated meanwhile."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(UsageError) as caught:
            store.load_memory(lake, info)
        return str(caught.value), time.perf_counter() - started, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def terabytes() -> bytes:
    members = fitting()
    members["vectors.npy"] = stored(npy("<f2", (1 << 41, 1)))  # 4 TiB declared, nothing held
    members["texts.npy"] = stored(npy("<U1", (1 << 41,)))
    return zip_of(members)


def test_a_tiny_memory_declaring_terabytes_is_refused_before_it_is_allocated(lake_with_version):
    lake, info, path = lake_with_version
    data = terabytes()
    assert len(data) < 1024
    path.write_bytes(data)
    message, seconds, peak = refused(lake, info)  # MemoryError before
    assert message == (
        f"captioner {info.version}: memory.npz is not a neighbour memory "
        "(vectors.npy declares float16 (2199023255552, 1) (4.0 TiB) but holds 0 bytes)"
    )
    assert "\n" not in message and seconds < 5 and peak < 16 << 20


def test_a_small_memory_that_inflates_to_a_gibibyte_is_refused_from_its_zip_directory(lake_with_version):
    lake, info, path = lake_with_version
    members = fitting()
    header = npy("<U67108864", (4,))  # four texts of 64 Mi characters (all NUL): 1 GiB
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = deflate.compress(header) + deflate.flush(zlib.Z_FULL_FLUSH)
    zeros = bytes(1 << 20)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)  # independent: repeated, it inflates again
    crc = zlib.crc32(header)
    for _ in range(1024):
        crc = zlib.crc32(zeros, crc)
    stream = head + block * 1024 + zlib.compressobj(9, zlib.DEFLATED, -15).flush()  # the last, empty block
    members["texts.npy"] = (stream, zipfile.ZIP_DEFLATED, crc, len(header) + (1 << 30))
    data = zip_of(members)
    assert len(data) < 2 << 20
    path.write_bytes(data)
    message, seconds, peak = refused(lake, info)  # loaded before: 1 GiB allocated and inflated
    assert message == (
        f"captioner {info.version}: memory.npz is not a neighbour memory "
        "(its arrays would inflate to 1.0 GiB, over the 512.0 MiB allowed for a file of 1.0 MiB)"
    )
    assert seconds < 5 and peak < 16 << 20


def test_a_memory_whose_headers_do_not_match_its_zip_is_refused(lake_with_version):
    lake, info, path = lake_with_version
    members = fitting()
    members["texts.npy"] = stored(npy("<U8", (4,), bytes(4 * 8 * 3)))  # three texts' bytes for four
    path.write_bytes(zip_of(members))
    message, _, _ = refused(lake, info)
    assert message.endswith("(texts.npy declares <U8 (4,) (128 bytes) but holds 96 bytes)"), message


def test_a_real_memory_still_loads_and_a_crafted_one_that_fits_does_too(lake_with_version):
    lake, info, path = lake_with_version
    rng = np.random.default_rng(0)
    memory = Memory.build(rng.normal(size=(50, FEATURES)).astype(np.float32), [f"text {i}" for i in range(50)], 100)
    path.write_bytes(memory.to_bytes())
    assert list(store.load_memory(lake, info).texts) == list(memory.texts)
    members = fitting()
    members["texts.npy"] = stored(npy("<U3", (4,), "abcdefghijkl".encode("utf-32-le")))
    path.write_bytes(zip_of(members))
    assert list(store.load_memory(lake, info).texts) == ["abc", "def", "ghi", "jkl"]


def test_search_says_once_that_a_refused_memory_leaves_text_queries_without_pictures(
    tmp_path, lake_with_version, caplog
):
    """The searcher (cbir search, cbir web, the query job) ranks by BLEU alone, and says why in one line."""
    lake, info, path = lake_with_version
    (path.parent / "card.json").write_text(info.to_json())
    path.write_bytes(terabytes())
    with caplog.at_level(logging.WARNING, logger="cbir.search"):
        assert load_pictures(lake, info.version, 5, 4) is None  # MemoryError before
    (line,) = [r.getMessage() for r in caplog.records if r.name == "cbir.search"]
    assert line.startswith(f"captioner {info.version}: memory.npz is not a neighbour memory (vectors.npy declares")
    assert line.endswith("queries are ranked without pictures")
