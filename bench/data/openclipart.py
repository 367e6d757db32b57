"""OpenClipart as a captioned corpus: Debian's openclipart-{png,svg} packages -> JSONL rows.

    python -m bench.data.openclipart [--out FILE] [--cache DIR]

The cache folder (default <repo>/.cbir/openclipart/, or $CBIR_OPENCLIPART) holds the two .deb
files and their unpacked tree; when the tree is missing the packages are fetched with
`apt-get download` and unpacked with `dpkg-deb -x` (load_rows() never fetches). Each drawing is
svg/<folders>/<name>.svg with a PNG at png/<folders>/<name>.png. A row:

    uri          absolute path of the PNG
    caption      the cleaned title (or, when the title is boilerplate, a short real description)
    title        the cleaned title, "" when boilerplate
    description  the cc:Work's dc:description when it is real text, else ""
    tags         dc:subject keywords, cleaned, deduplicated
    category     the first folder ("science"); subcategory the whole folder path ("science/astronomy")
    split        train/dev/test, 80/10/10 by a hash of the file name (see SPLIT below)

Rules, from the data (8,121 SVGs of package version 0.18+dfsg-19):

* SVGs are foreign input: parsed with defusedxml (no DTD entities, no external references), at
  most MAX_SVG_BYTES read. Only the cc:Work's own dc:title/dc:description count, not the
  dc:title of its publisher/creator agents. Any failure is a skipped row with a reason.
* Debian replaces identical files with symlinks, and the same drawing sits in several folders
  (floppy_frederic_moser_01 in computer/ and office/): one row per distinct PNG file and per
  (file name, title); regular files win over links.
* A title is boilerplate when (a) it is empty; (b) it credits or names a set: "Clipart by ...",
  "Part of ...", or holds one of the words collection, theme, iconset, icons, cliparts, clipart,
  svg, submission (its typo "sibmission" too), various; or (c) it is shared: SHARED_MIN or more
  distinct file names carry it and most of them do not begin with the title's words. (c) is what
  tells a set name ("gramastar" on 1,375 star shapes, "card" on 226 playing cards, "Chess pieces",
  "AIGA_Symbol_Signs") from a numbered series of one subject ("Lightning" on
  lightning_jon_phillips_01..11, which keeps its title).
* A description is dropped when it is not text: an e-mail or URL only (they are cut out of any
  text), HASH(0x...), "EPS converted from ...", equal to the title or to the creator's name, or
  boilerplate by the title rules ("Part of Hotel Icons Collection"; "UK roadsigns" on 29 signs).
* Caption: the title. When the title is boilerplate, a remaining description of at most
  FALLBACK_WORDS words becomes the caption: in this data such descriptions are one-line names
  written per drawing ("Traffic light with red light on"), while longer ones are essays
  (flag histories) that would teach the captioner prose; otherwise the row is dropped.
* Cleaning: HTML entities unescaped, underscores/hyphens to spaces, a one-word CamelCase title
  split ("CayennePepperRevisited"), trailing numbering dropped ("_01", "-2", " 02", "cake1"),
  whitespace collapsed; case kept (tokenizers lowercase).
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import os
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree.ElementTree import ParseError

import defusedxml
import defusedxml.ElementTree as SafeET

PACKAGES = ("openclipart-png", "openclipart-svg")
TREE = Path("usr/share/openclipart")
MAX_SVG_BYTES = 4 << 20  # the largest SVG in the package is 1.7 MB
SHARED_MIN = 5  # distinct file names sharing a title before it may be a set name
SERIES_PREFIX = 20  # the package truncates file names: compare this many characters of the title
FALLBACK_WORDS = 12
SPLIT = (("test", 0.1), ("dev", 0.2))  # cumulative hash buckets; the rest is train

CC = ("http://web.resource.org/cc/", "http://creativecommons.org/ns#")
DC = "{http://purl.org/dc/elements/1.1/}"
RDF_LI = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}li"

SET_WORDS = re.compile(
    r"\b(collection|themes?|icon ?sets?|icons|cliparts?|svg|s[iu]bmission|various)\b|"
    r"^(clipart by|part of)\b",
    re.I,
)
NOT_TEXT = re.compile(r"HASH\(0x[0-9a-f]+\)|^EPS converted from\b", re.I)
EMAIL_OR_URL = re.compile(
    r"(\b(by|from|at|see|contact|e-?mail)\s*:?\s*)?"  # with the word that leads in
    r"(\S+@\S+\.\w+|\b(https?|ftp)://\S+|\bwww\.\S+)",
    re.I,
)
CREDIT = re.compile(r"^clip ?art by [^-]+?\s+-\s+", re.I)  # "Clipart by <author> - <subject>"
FILE_SUFFIX = re.compile(r"(\.svg|\s+in svg( format)?)$", re.I)
NUMBERING = re.compile(r"([_-]+|\s+(?=0))\d{1,3}[a-z]?$|(?<=[a-z]{3})\d{1,3}$")  # _01, -2, " 02", cake1
NOISE_TAGS = {"hash", "none", "unsorted", "untitled"}


@dataclass
class Drawing:
    """One SVG/PNG pair after parsing, before the boilerplate rules."""

    rel: str  # the relative path without the suffix: science/astronomy/moon_01
    png: Path
    title: str  # as written (credits and numbering still in)
    description: str
    creator: str
    tags: list[str]
    linked: bool  # the SVG or PNG is a symlink (a Debian dedup of an identical file)


@dataclass
class Corpus:
    rows: list[dict]
    images: int = 0
    skipped: Counter = field(default_factory=Counter)


# --- locating and fetching the packages ------------------------------------------------------


def default_cache() -> Path:
    return Path(os.environ.get("CBIR_OPENCLIPART") or Path(__file__).resolve().parents[2] / ".cbir" / "openclipart")


def find_tree(folder: str | Path) -> Path | None:
    """The folder holding svg/ and png/: folder itself, or usr/share/openclipart under it or under a subfolder."""
    folder = Path(folder)
    for candidate in (folder, folder / TREE, *(sub / TREE for sub in sorted(folder.glob("*")) if sub.is_dir())):
        if (candidate / "svg").is_dir() and (candidate / "png").is_dir():
            return candidate.resolve()
    return None


def fetch(cache: str | Path) -> Path:
    """The unpacked tree in cache, downloading (apt-get download) and unpacking (dpkg-deb -x) what is missing."""
    cache = Path(cache)
    tree = find_tree(cache)
    if tree:
        return tree
    cache.mkdir(parents=True, exist_ok=True)
    for package in PACKAGES:
        if not list(cache.glob(f"{package}_*.deb")):
            print(f"apt-get download {package} (in {cache})", flush=True)
            try:
                subprocess.run(["apt-get", "download", package], cwd=cache, check=True)
            except (OSError, subprocess.CalledProcessError) as error:
                raise SystemExit(
                    f"apt-get download {package} failed ({error}): put {package}_*.deb "
                    f"in {cache}, or its unpacked usr/share/openclipart, and run again"
                ) from None
    for deb in sorted(cache.glob("openclipart-*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(cache / "x")], check=True)
    tree = find_tree(cache)
    if not tree:
        raise SystemExit(f"no {TREE} in {cache} after unpacking the packages")
    return tree


# --- reading the SVG metadata ------------------------------------------------------------------


def read_metadata(svg: Path) -> tuple[dict | None, str]:
    """The cc:Work's title, description and keywords, or (None, reason)."""
    try:
        with open(svg, "rb") as file:
            data = file.read(MAX_SVG_BYTES + 1)
    except OSError:
        return None, "unreadable-svg"
    if len(data) > MAX_SVG_BYTES:
        return None, "svg-too-large"
    try:
        root = SafeET.fromstring(data)
    except defusedxml.DefusedXmlException:
        return None, "unsafe-xml"  # entity declarations (billion laughs) or external references
    except (ParseError, ValueError, UnicodeError):
        return None, "malformed-svg"
    work = next(
        (el for el in root.iter() if isinstance(el.tag, str) and any(el.tag == f"{{{ns}}}Work" for ns in CC)), None
    )
    if work is None:
        return {"title": "", "description": "", "tags": [], "creator": ""}, ""
    # Direct children only: the publisher's and creator's cc:Agent carry a dc:title of their own.
    title = work.find(f"{DC}title")
    description = work.find(f"{DC}description")
    subject = work.find(f"{DC}subject")
    tags = []
    if subject is not None:
        items = [li.text or "" for li in subject.iter(RDF_LI)]
        tags = items if items else re.split(r"[,;]", _text(subject))
    creator = work.find(f"{DC}creator")
    return {
        "title": _text(title),
        "description": _text(description),
        "tags": tags,
        "creator": _text(creator.find(f".//{DC}title")) if creator is not None else "",
    }, ""


def _text(element) -> str:
    return "".join(element.itertext()).strip() if element is not None else ""


def scan(tree: Path) -> tuple[list[Drawing], Counter, int]:
    """Every SVG/PNG pair under tree, parsed; pairs that cannot be read are counted by reason."""
    skipped: Counter = Counter()
    svgs = {p.relative_to(tree / "svg").with_suffix("").as_posix(): p for p in (tree / "svg").rglob("*.svg")}
    pngs = {p.relative_to(tree / "png").with_suffix("").as_posix(): p for p in (tree / "png").rglob("*.png")}
    skipped["no-png"] = len(svgs.keys() - pngs.keys())
    skipped["no-svg"] = len(pngs.keys() - svgs.keys())
    images = len(svgs.keys() | pngs.keys())
    drawings = []
    for rel in sorted(svgs.keys() & pngs.keys()):
        svg, png = svgs[rel], pngs[rel]
        if not png.is_file():
            skipped["no-png"] += 1  # a dangling link
            continue
        meta, reason = read_metadata(svg)
        if meta is None:
            skipped[reason] += 1
            continue
        creator = prose(meta["creator"])
        tags = [tag for tag in clean_tags(meta["tags"]) if tag != creator.lower()]  # some artists tag their name
        drawings.append(
            Drawing(
                rel,
                png,
                prose(meta["title"]),
                prose(meta["description"]),
                creator,
                tags,
                svg.is_symlink() or png.is_symlink(),
            )
        )
    return drawings, skipped, images


# --- cleaning and the boilerplate rules --------------------------------------------------------


def clean(text: str, numbering: bool = True) -> str:
    text = html.unescape(html.unescape(text or ""))  # some titles are escaped twice: "B &amp;amp; W"
    text = FILE_SUFFIX.sub("", text.strip())
    if numbering:
        text = NUMBERING.sub("", text)
    text = re.sub(r"_|(?<!\d)-|-(?!\d)", " ", text)  # keeps ranges: 1931-1939
    if " " not in text:  # a file name for a title: CayennePepperRevisited -> Cayenne Pepper Revisited
        parts = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", text).split()
        text = " ".join(parts) if all(len(part) > 1 for part in parts) else text  # not "i Pod"
    return " ".join(text.split()).strip(" ,;:")


def prose(text: str) -> str:
    return " ".join(html.unescape(html.unescape(text or "")).split())


def clean_tags(tags: list[str]) -> list[str]:
    out: dict[str, None] = {}
    for tag in tags:
        tag = clean(tag or "", numbering=False).lower()
        if tag and tag not in NOISE_TAGS and not re.fullmatch(r"\d+|0x[0-9a-f]+", tag):  # HASH(0x...) remnants
            out[tag] = None
    return list(out)


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def shared_names(drawings: list[Drawing], text_of) -> set[str]:
    """Texts carried by SHARED_MIN+ distinct file names, most of which do not begin with the text:
    the name of a set, not of a drawing (rule (c) in the module docstring)."""
    stems: dict[str, set[str]] = {}
    for drawing in drawings:
        if text_of(drawing):
            stems.setdefault(text_of(drawing), set()).add(_norm(drawing.rel.rsplit("/", 1)[-1]))
    shared = set()
    for text, names in stems.items():
        prefix = _norm(text)[:SERIES_PREFIX]
        series = sum(1 for name in names if prefix and name.startswith(prefix))
        if len(names) >= SHARED_MIN and series * 2 < len(names):
            shared.add(text)
    return shared


def boilerplate_free(title: str, shared: set[str]) -> str:
    """The title, its credit cut ("Clipart by Steve Hall - United States - Alabama" -> "United
    States Alabama"), or "" when it is boilerplate. A shared title is judged whole, so a credited
    set name ("Clipart by Nicu Buculei - jigsaw red" on 48 pieces) stays dropped."""
    if clean(title) in shared:
        return ""
    title = clean(CREDIT.sub("", title))
    if SET_WORDS.search(title) or not re.search(r"[^\W\d_]", title):
        return ""
    return title


def real_description(drawing: Drawing, shared: set[str]) -> str:
    """The description without e-mails and URLs, or "" when what is left is not a drawing's text."""
    raw = drawing.description
    if not raw or NOT_TEXT.search(raw) or raw in shared or SET_WORDS.search(raw) or raw == drawing.creator:
        return ""
    text = " ".join(EMAIL_OR_URL.sub(" ", raw).split()).strip(" ,;:-")
    if len(re.findall(r"[^\W\d_]", text)) < 3 or _norm(text) == _norm(clean(drawing.title)):
        return ""
    return text


def build(drawings: list[Drawing], skipped: Counter, images: int) -> Corpus:
    corpus = Corpus([], images, skipped)
    # Regular files first, so a symlinked copy is the one dropped.
    drawings = sorted(drawings, key=lambda d: (d.linked, d.rel))
    seen_png, seen_name, unique = set(), set(), []
    for drawing in drawings:
        real, name = os.path.realpath(drawing.png), (drawing.rel.rsplit("/", 1)[-1], clean(drawing.title))
        if real in seen_png or name in seen_name:
            corpus.skipped["duplicate"] += 1
            continue
        seen_png.add(real)
        seen_name.add(name)
        unique.append(drawing)
    shared_titles = shared_names(unique, lambda d: clean(d.title))
    shared_descriptions = shared_names(unique, lambda d: d.description)
    for drawing in sorted(unique, key=lambda d: d.rel):
        title = boilerplate_free(drawing.title, shared_titles)
        description = real_description(drawing, shared_descriptions)
        caption = title or (description if len(description.split()) <= FALLBACK_WORDS else "")
        if not caption:
            corpus.skipped["no-title" if not drawing.title else "boilerplate-title"] += 1
            continue
        folders = drawing.rel.split("/")[:-1]
        corpus.rows.append(
            {
                "uri": str(drawing.png.absolute()),
                "caption": caption,
                "title": title,
                "description": description,
                "tags": drawing.tags,
                "category": folders[0] if folders else "",
                "subcategory": "/".join(folders),
                "split": split_of(drawing.rel),
            }
        )
    corpus.skipped = Counter({reason: n for reason, n in corpus.skipped.items() if n})
    return corpus


def split_of(rel: str) -> str:
    """train/dev/test from a hash of the file name alone, so the copies of one drawing in several
    folders share a split and adding files never moves another."""
    name = rel.rsplit("/", 1)[-1]
    bucket = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 0x100000000
    return next((split for split, upper in SPLIT if bucket < upper), "train")


# --- the entry points --------------------------------------------------------------------------


def load_rows(folder: str | Path | None = None) -> Corpus:
    """The corpus from an unpacked folder (the cache, or a folder with usr/share/openclipart or
    svg/ + png/); never downloads."""
    folder = Path(folder) if folder else default_cache()
    tree = find_tree(folder)
    if tree is None:
        raise FileNotFoundError(
            f"no OpenClipart tree (svg/ and png/) in {folder}: run `python -m bench.data.openclipart` to fetch it"
        )
    return build(*scan(tree))


def corpus(folder: str | Path | None = None, split: str | None = None) -> list[dict]:
    """The kept rows (of one split, when given), for bench/quality.py."""
    rows = load_rows(folder).rows
    return [row for row in rows if split is None or row["split"] == split]


def report(result: Corpus, examples: int = 15) -> str:
    kept = len(result.rows)
    lines = [f"images {result.images:,}  kept {kept:,}  dropped {sum(result.skipped.values()):,}"]
    lines += [f"  dropped {reason:<20} {n:>6,}" for reason, n in result.skipped.most_common()]
    for what in ("split", "category"):
        counts = Counter(row[what] for row in result.rows)
        lines.append(f"{what}:")
        lines += [f"  {key or '(none)':<20} {n:>6,}  {n / max(kept, 1):6.1%}" for key, n in counts.most_common()]
    lines.append(f"{examples} examples (caption | description | tags | subcategory | split):")
    step = max(1, kept // max(examples, 1))
    for row in result.rows[::step][:examples]:
        lines.append(
            f"  {row['caption']!r} | {row['description'][:50]!r} | {', '.join(row['tags'][:5])} | "
            f"{row['subcategory']} | {row['split']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.data.openclipart", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="folder of the packages and their unpacked tree (default <repo>/.cbir/openclipart or $CBIR_OPENCLIPART)",
    )
    parser.add_argument("--out", type=Path, default=None, help="JSONL to write (default <cache>/openclipart.jsonl)")
    args = parser.parse_args(argv)
    cache = args.cache or default_cache()
    tree = fetch(cache)
    result = build(*scan(tree))
    out = args.out or cache / "openclipart.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in result.rows), encoding="utf-8")
    print(report(result))
    print(f"wrote {len(result.rows):,} rows to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
