"""The OpenClipart loader on hand-made SVG/PNG pairs laid out as the Debian packages install them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.data import openclipart as oc

SVG = """<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:cc="http://web.resource.org/cc/"
     xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <metadata><rdf:RDF><cc:Work rdf:about="">
    <dc:title>{title}</dc:title>
    <dc:description>{description}</dc:description>
    <dc:subject><rdf:Bag>{tags}</rdf:Bag></dc:subject>
    <dc:publisher><cc:Agent><dc:title>Open Clip Art Library</dc:title></cc:Agent></dc:publisher>
    <dc:creator><cc:Agent><dc:title>Jane Artist</dc:title></cc:Agent></dc:creator>
  </cc:Work></rdf:RDF></metadata>
  <rect width="10" height="10"/>
</svg>
"""
BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE svg [<!ENTITY a "lol"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">
  <!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;"><!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;">]>
<svg xmlns="http://www.w3.org/2000/svg"><title>&d;</title></svg>
"""
PNG = b"\x89PNG\r\n\x1a\n"  # the loader never decodes the PNG


def add(
    tree: Path, rel: str, title: str = "", description: str = "", tags=(), svg: str | None = None, png: bool = True
) -> None:
    """svg/<rel>.svg (with this metadata, or the given text) and png/<rel>.png under tree."""
    svg_path, png_path = tree / "svg" / f"{rel}.svg", tree / "png" / f"{rel}.png"
    svg_path.parent.mkdir(parents=True, exist_ok=True)
    lis = "".join(f"<rdf:li>{tag}</rdf:li>" for tag in tags)
    svg_path.write_text(svg if svg is not None else SVG.format(title=title, description=description, tags=lis))
    if png:
        png_path.parent.mkdir(parents=True, exist_ok=True)
        png_path.write_bytes(PNG)


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "x" / "usr" / "share" / "openclipart"
    add(
        root,
        "science/astronomy/saturn_dan_gerhards_01",
        "Saturn_01",
        "A ringed planet, by jane@example.org",
        ["planet", "Space", "planet", "hash", ""],
    )
    add(root, "animals/mammals/bored_dog", "Bored-dog", "http://example.org/dog", ["dog"])
    add(root, "food/apple", "Apple", "Apple", ["fruit"])
    add(root, "food/cayenne_pepper", "CayennePepperRevisited")
    add(root, "electronics/ipod", "iPod")
    add(root, "food/pear", "Pear", "HASH(0x8677e2c)")
    add(root, "food/plum", "Plum 02", "Jane Artist", ["jane artist", "plum"])  # the creator's name is no description
    add(root, "flags/alabama", "Clipart by Steve Hall - United States - Alabama", "", ["flag"])
    add(root, "computer/icons/kalarm", "Part of the Flat Icon Collection (Wed Aug 25 23:29:46 2004)")
    add(root, "computer/icons/lemon", "Lemon SVG theme")
    add(root, "computer/icons/gold", "gold-theme")
    add(root, "computer/icons/light", "Lemon SVG theme", "Traffic light with red light on")
    add(root, "unsorted/untitled", "", "EPS converted from http://aiga.org")
    for name in ["star_5pt", "star_7pt", "star_9pt", "polygon_3", "polygon_4"]:
        add(root, f"shapes/stars/{name}", "gramastar", "", ["stars"])  # a set name, on different file names
    for i in range(1, 6):
        add(root, f"weather/lightning_jon_phillips_0{i}", "Lightning", "This is a nice detailed image of lightning.")
    add(root, "tools/saw", "Saw", png=False)  # an SVG without its PNG
    (root / "png" / "tools").mkdir(parents=True, exist_ok=True)
    (root / "png" / "tools" / "hammer.png").write_bytes(PNG)  # a PNG without its SVG
    add(root, "tools/broken", svg="<svg><metadata><dc:title>oops</svg")
    add(root, "tools/bomb", svg=BILLION_LAUGHS)
    return tmp_path


def by_title(corpus: oc.Corpus) -> dict[str, dict]:
    return {row["caption"]: row for row in corpus.rows}


def test_titles_descriptions_and_keywords_are_cleaned(tree):
    rows = by_title(oc.load_rows(tree))
    saturn = rows["Saturn"]  # "_01" numbering dropped; the creator agent's dc:title is not the title
    assert saturn["title"] == "Saturn"
    assert saturn["description"] == "A ringed planet"  # the e-mail is cut out, with its "by"
    assert saturn["tags"] == ["planet", "space"]  # lowercased, deduplicated, "hash" and empty ones dropped
    assert saturn["category"] == "science" and saturn["subcategory"] == "science/astronomy"
    assert Path(saturn["uri"]).is_absolute()
    assert saturn["uri"].endswith("png/science/astronomy/saturn_dan_gerhards_01.png")
    assert rows["Bored dog"]["description"] == ""  # a URL only
    assert rows["Apple"]["description"] == ""  # the title again
    assert "Cayenne Pepper Revisited" in rows and "iPod" in rows
    assert rows["Pear"]["description"] == ""  # HASH(0x...)
    assert rows["Plum"]["description"] == "" and rows["Plum"]["tags"] == ["plum"]
    assert rows["United States Alabama"]["tags"] == ["flag"]  # the credit is cut, the subject kept


def test_boilerplate_titles_are_dropped_and_series_kept(tree):
    corpus = oc.load_rows(tree)
    captions = [row["caption"] for row in corpus.rows]
    assert not any("Collection" in c or "theme" in c or c == "gramastar" for c in captions)
    assert captions.count("Lightning") == 5  # one subject on a numbered series of file names
    light = by_title(corpus)["Traffic light with red light on"]  # a short real description stands in
    assert light["title"] == "" and light["subcategory"] == "computer/icons"
    assert corpus.skipped["boilerplate-title"] == 3 + 5  # flat, lemon, gold + five gramastar
    assert corpus.skipped["no-title"] == 1


def test_bad_pairs_are_skipped_rows_counted_by_reason(tree):
    corpus = oc.load_rows(tree)
    assert corpus.skipped["no-png"] == 1 and corpus.skipped["no-svg"] == 1
    assert corpus.skipped["malformed-svg"] == 1
    assert corpus.skipped["unsafe-xml"] == 1  # the entity expansion is refused, not expanded
    assert corpus.images == len(corpus.rows) + sum(corpus.skipped.values())


def test_oversized_svg_is_not_read(tree, monkeypatch):
    monkeypatch.setattr(oc, "MAX_SVG_BYTES", 100)
    corpus = oc.load_rows(tree)
    assert corpus.rows == [] and corpus.skipped["svg-too-large"] > 0


def test_symlinked_and_copied_drawings_are_one_row(tree):
    root = tree / "x" / "usr" / "share" / "openclipart"
    add(root, "geography/astronomy/saturn_dan_gerhards_01", "Saturn_01")  # the same drawing in another folder
    (root / "svg" / "animals" / "dog.svg").symlink_to(root / "svg" / "animals" / "mammals" / "bored_dog.svg")
    (root / "png" / "animals" / "dog.png").symlink_to(root / "png" / "animals" / "mammals" / "bored_dog.png")
    corpus = oc.load_rows(tree)
    assert [row["caption"] for row in corpus.rows].count("Saturn") == 1
    assert [row["subcategory"] for row in corpus.rows if row["caption"] == "Bored dog"] == ["animals/mammals"]
    assert corpus.skipped["duplicate"] == 2


def test_split_is_deterministic_and_stable_when_files_are_added(tree):
    before = {row["uri"]: row["split"] for row in oc.load_rows(tree).rows}
    root = tree / "x" / "usr" / "share" / "openclipart"
    for i in range(200):
        add(root, f"people/person_{i:03d}x", f"Person number {i}")
    rows = oc.load_rows(tree).rows
    after = {row["uri"]: row["split"] for row in rows}
    assert {uri: after[uri] for uri in before} == before
    splits = [row["split"] for row in rows]
    assert {"train", "dev", "test"} <= set(splits) and 0.65 < splits.count("train") / len(splits) < 0.95
    assert oc.split_of("a/b/name") == oc.split_of("c/name")  # copies of a drawing share a split


def test_cli_writes_jsonl_that_train_and_eval_read(tree, tmp_path, capsys):
    out = tmp_path / "oc.jsonl"
    oc.main(["--cache", str(tree), "--out", str(out)])  # the tree is there: nothing is fetched
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all({"uri", "caption", "split", "category", "title", "description", "tags"} <= set(r) for r in rows)
    printed = capsys.readouterr().out
    assert "kept" in printed and "unsafe-xml" in printed
    assert oc.corpus(tree, split="train") == [r for r in rows if r["split"] == "train"]


def test_missing_tree_is_an_error_not_a_download(tmp_path):
    with pytest.raises(FileNotFoundError):
        oc.load_rows(tmp_path)


def test_train_and_eval_read_the_jsonl(tree, tmp_path, local_settings):
    from jobs.evaluate import read_table_rows
    from models.datasets import read_dataset

    out = tmp_path / "oc.jsonl"
    oc.main(["--cache", str(tree), "--out", str(out)])
    written = [json.loads(line) for line in out.read_text().splitlines()]
    dataset = read_dataset(str(out), local_settings)
    assert [(r.caption, r.split) for r in dataset.rows] == [(r["caption"], r["split"]) for r in written]
    assert not dataset.skipped
    assert {r["category"] for r in read_table_rows(str(out), local_settings)} == {r["category"] for r in written}
