"""Near-duplicates (search/duplicates.py): groups of copies by the cosine of their likeness vectors, the
folding of a ranked list, and `cbir duplicates` on a small lake (its table, its gallery, its message for
a lake indexed without likeness vectors)."""

from __future__ import annotations

import io
import random
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from cbir.images import image_id
from cbir.lake import Lake, new_run_id
from cbir.schemas import CAPTIONS, MANIFEST
from cbir.storage import put_bytes
from models.card import EncoderInfo, ModelCard
from search.duplicates import fold, groups

from conftest import image_bytes, make_settings

XSS = "<script>alert('x')</script>"


def unit(rows) -> np.ndarray:
    rows = np.asarray(rows, np.float64)
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype("<f2")


def copies_and_others(seed: int, originals: int = 30, copies: int = 2, d: int = 64):
    """Random unit vectors, and beside some of them copies: the original plus a little noise (cosine ~0.99)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(originals, d))
    rows, ids, truth = list(base), [f"o{i:03d}" for i in range(originals)], []
    for i in range(0, originals, 3):
        members = [ids[i]]
        for c in range(copies):
            rows.append(base[i] + rng.normal(scale=0.08, size=d) * np.linalg.norm(base[i]) / np.sqrt(d))
            ids.append(f"c{i:03d}-{c}")
            members.append(ids[-1])
        truth.append(sorted(members))
    return ids, unit(rows), truth


def test_copies_group_and_distinct_images_do_not():
    ids, vectors, truth = copies_and_others(0)
    found = groups(ids, vectors, 0.95)
    assert sorted(sorted(group) for group in found) == sorted(truth)
    assert all(group[0].startswith("o") or group[0].startswith("c") for group in found)
    assert groups(ids, vectors, 0.9999) == []  # the noise keeps every copy below an exact match


def test_the_threshold_is_inclusive():
    vectors = unit([[1, 0, 0], [0.5, np.sqrt(0.75), 0], [0, 0, 1]])  # cosine exactly 0.5 (float16 0.5 * 1.0)
    ids = ["a", "b", "c"]
    assert groups(ids, vectors, 0.5) == [["a", "b"]]
    assert groups(ids, vectors, float(np.nextafter(np.float32(0.5), np.float32(1)))) == []


def test_an_image_without_a_vector_never_groups_whatever_the_threshold():
    vectors = unit([[1, 0], [1, 0.001], [1, 0]])
    vectors[2] = 0  # no likeness vector
    assert groups(["a", "b", "none"], vectors, -1.0) == [["a", "b"]]
    assert groups(["a"], None, 0.5) == [] and groups([], np.zeros((0, 4), "<f2"), 0.5) == []


def test_blockwise_equals_one_shot_and_input_order_does_not_matter():
    ids, vectors, _ = copies_and_others(1, originals=60, copies=3, d=32)
    one_shot = groups(ids, vectors, 0.9, block=10_000)
    assert one_shot and groups(ids, vectors, 0.9, block=7) == one_shot
    order = list(range(len(ids)))
    random.Random(0).shuffle(order)
    assert groups([ids[i] for i in order], vectors[order], 0.9, block=5) == one_shot


def test_a_group_lists_its_most_linked_member_first_then_by_likeness_to_it():
    # b is like a and c; a and c are not alike: one group (a chain), b first.
    vectors = unit([[np.cos(np.radians(deg)), np.sin(np.radians(deg))] for deg in (0, 10, 20, 90)])
    assert groups(["a", "b", "c", "d"], vectors, 0.97) == [["b", "a", "c"]]
    # two groups, the larger first
    vectors = unit([[1, 0, 0], [0, 1, 0], [0, 1, 0.01], [0, 1, 0.02], [1, 0.01, 0]])
    assert groups(["p", "q", "r", "s", "t"], vectors, 0.99) == [["q", "r", "s"], ["p", "t"]]  # all alike: ties by id


def hits(n: int) -> list[dict]:
    return [{"rank": r, "image_id": f"i{r}"} for r in range(1, n + 1)]


def test_fold_keeps_rank_order_and_folds_under_the_first_higher_ranked_hit_it_resembles():
    a, b = [1.0, 0, 0], [0, 1.0, 0]
    vectors = list(unit([a, b, [1, 0.02, 0], [0.02, 1, 0], [0.7, 0.7, 0], [1, 0.01, 0.01], [0.7, 0.7, 0.02]]))
    given = hits(7)
    shown = fold(given, vectors, 0.95)
    assert [h["image_id"] for h in shown] == ["i1", "i2", "i5"]
    assert [[f["image_id"] for f in h["folded"]] for h in shown] == [["i3", "i6"], ["i4"], ["i7"]]
    assert all("folded" not in h for h in given)  # the hits given are not changed
    # like both i1 and a copy of i1 ranked below it: under i1, the first
    both = fold(hits(3), list(unit([[1, 0.05], [1, 0], [1, 0.1]])), 0.99)
    assert [h["image_id"] for h in both] == ["i1"] and [f["image_id"] for f in both[0]["folded"]] == ["i2", "i3"]


def test_fold_leaves_hits_without_a_vector_alone():
    vectors = [None, unit([[1, 0]])[0], np.zeros(2, "<f2"), unit([[1, 0]])[0]]
    shown = fold(hits(4), vectors, 0.5)
    assert [h["image_id"] for h in shown] == ["i1", "i2", "i3"]
    assert [len(h["folded"]) for h in shown] == [0, 1, 0]
    assert fold([], [], 0.9) == []


# cbir duplicates, on a lake written without Spark: images stored and in the manifest, a captioner card and a
# captions run with likeness vectors, as `cbir index` writes them.
VERSION = "20260101T000000Z-0000d0b1"


def write_run(lake: Lake, name: str, rows: list[dict], schema: pa.Schema, **meta) -> None:
    table, run_id = lake.table(name), new_run_id()
    writer = table.part_writer(run_id)
    writer.write(pa.RecordBatch.from_pylist([{**dict.fromkeys(schema.names), **row} for row in rows], schema=schema))
    table.commit(run_id, [writer.close()], **meta)


def resized(data: bytes) -> bytes:
    """The same picture at another size: other bytes, another image id."""
    with Image.open(io.BytesIO(data)) as image:
        out = io.BytesIO()
        image.resize((96, 72)).save(out, format="PNG")
    return out.getvalue()


def small_lake(tmp: Path, with_vectors: bool = True) -> dict:
    """Five images: a drawing and its copy at another size, another drawing and its copy, and one alone."""
    settings = make_settings(tmp)
    lake = Lake.open(settings)
    lake.check()
    first, second = image_bytes(1, fmt="PNG"), image_bytes(2, fmt="PNG")
    pictures = [first, resized(first), second, resized(second), image_bytes(3, fmt="PNG")]
    captions = [XSS, "a drawing, larger", "a second drawing", "the second, larger", "alone"]
    vectors = unit([[1, 0, 0, 0], [1, 0.03, 0, 0], [0, 1, 0, 0], [0, 1, 0.03, 0], [0, 0, 0, 1]])  # cosine 0.9996
    ids, now = [image_id(data) for data in pictures], datetime.now(UTC)
    manifest = []
    for number, (key, data) in enumerate(zip(ids, pictures)):
        lake.put_image(key, "PNG", data)
        uri = str(tmp / f"{number}<b>.png")
        manifest.append(dict(image_id=key, source=str(tmp), uri=uri, format="PNG", status="ok", ingested_at=now))
    write_run(lake, "manifest", manifest, MANIFEST)
    rows = [
        dict(
            image_id=key,
            uri=row["uri"],
            caption=caption,
            visual=vector.tobytes() if with_vectors else None,
            model_version=VERSION,
            status="ok",
            indexed_at=now,
            run_id="r",
        )
        for key, row, caption, vector in zip(ids, manifest, captions, vectors)
    ]
    write_run(lake, "captions", rows, CAPTIONS, model_version=VERSION)
    card = ModelCard(
        version=VERSION, encoder=EncoderInfo(name="vgg16", weights="random", key="vgg16-random", feature_dim=4)
    )
    put_bytes(lake.fs, lake.path("models", "captioner", VERSION, "card.json"), card.to_json().encode())
    put_bytes(lake.fs, lake.path("models", "captioner", "current"), VERSION.encode(), overwrite=True)
    return {"ids": ids, "overrides": ["--set", f"lake={tmp}/lake", "--set", f"state_dir={tmp}/state"]}


def test_cbir_duplicates_lists_the_copies_and_writes_a_gallery_with_every_text_escaped(tmp_path, capsys):
    from cli.main import main

    lake = small_lake(tmp_path)
    assert main(["duplicates", "--out", str(tmp_path / "review"), *lake["overrides"]]) == 0
    out = capsys.readouterr().out
    assert "2 groups of near-duplicates among 5 images" in out
    table = [line.split("│")[1:-1] for line in out.splitlines() if line.count("│") == 5]
    listed = [(cells[0].strip(), cells[1].strip()) for cells in table if cells[1].strip()]
    ids = lake["ids"]
    assert sorted(listed) == sorted([("1", ids[0][:12]), ("1", ids[1][:12]), ("2", ids[2][:12]), ("2", ids[3][:12])])
    page = (tmp_path / "review" / "duplicates.html").read_text()
    assert XSS not in page and html_escaped(XSS) in page and "<b>" not in page
    assert page.count("<figure>") == 4 and page.count("data:image/jpeg;base64,") == 4
    assert ids[4][:12] not in page

    assert main(["duplicates", *lake["overrides"], "--set", "duplicates.threshold=0.9999"]) == 0
    assert "no near-duplicates among 5 images" in capsys.readouterr().out


def html_escaped(text: str) -> str:
    import html

    return html.escape(text)


def test_cbir_duplicates_on_a_lake_without_likeness_vectors_names_the_command_to_run(tmp_path, capsys):
    from cli.main import main

    lake = small_lake(tmp_path, with_vectors=False)
    assert main(["duplicates", *lake["overrides"]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"`cbir index --drop-version {VERSION}`" in err[0]


@pytest.mark.parametrize("value", ["0", "1.5", "near"])
def test_a_bad_threshold_is_refused_with_its_key(tmp_path, capsys, value):
    from cli.main import main

    assert main(["duplicates", "--set", f"duplicates.threshold={value}", "--set", f"lake={tmp_path}/lake"]) == 2
    assert "duplicates.threshold" in capsys.readouterr().err
