"""Captioned data sets for training -> (uri, caption, split) rows.

Three shapes are read:
  * a Flickr8k folder: Flickr8k.token.txt ("<image>#<n>\\t<caption>") and, when present, the
    Flickr_8k.{train,dev,test}Images.txt lists; or the Kaggle copy, captions.txt ("image,caption");
  * a COCO captions JSON ("images" + "annotations") with its image folder (--images, or a
    folder beside the JSON named like it: captions_val2017.json -> val2017/);
  * any table (CSV, JSONL, Parquet) with `uri` and `caption`, and optionally `split` and `category` (what
    the learned likeness takes as its positives, where a data set has one).
Rows without a split are assigned one from a hash of the image, so reruns agree.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import posixpath
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import pyarrow.fs as pafs

from cbir.errors import UsageError
from cbir.reader import Source, read_rows, resolve_source, resolve_uri, text_value
from cbir.settings import Settings

SPLITS = {"train": "train", "dev": "dev", "val": "dev", "valid": "dev", "validation": "dev", "test": "test"}
IMAGE_FOLDERS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images", "images", ".")


class Row(NamedTuple):
    uri: str
    caption: str
    split: str
    category: str = ""


@dataclass
class Dataset:
    uri: str
    kind: str
    rows: list[Row]
    skipped: Counter = field(default_factory=Counter)


def read_dataset(uri: str, settings: Settings, images: str | None = None) -> Dataset:
    source = resolve_source(uri, settings, columns=("uri", "caption"), what="data set")
    if source.kind == "folder":
        dataset = _flickr8k(source)
    elif source.kind == "jsonl" and _is_coco(source):
        dataset = _coco(source, images)
    elif source.kind in ("csv", "jsonl", "parquet"):
        dataset = _table(source)
    else:
        raise UsageError(
            f"data set {uri}: expected a Flickr8k folder, a COCO captions JSON or a CSV/JSONL/Parquet "
            "table of uri and caption"
        )
    _assign_splits(dataset, settings.train.dev_fraction, settings.train.test_fraction)
    return dataset


def _assign_splits(dataset: Dataset, dev: float, test: float) -> None:
    for i, row in enumerate(dataset.rows):
        if not row.split:
            bucket = int(hashlib.sha1(split_key(row.uri).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
            split = "test" if bucket < test else "dev" if bucket < test + dev else "train"
            dataset.rows[i] = row._replace(split=split)


def split_key(uri: str) -> str:
    """What a row's split is drawn from: the image's file name, not its whole path, so a data set copied,
    moved or installed elsewhere (the demo's corpus sits in site-packages) keeps its splits."""
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _caption_rows(dataset: Dataset, items: Iterator[tuple]) -> Dataset:
    """Keep (uri, caption, split[, category]) items with a uri and a caption; count the others by reason."""
    for uri, caption, split, *category in items:
        caption = text_value(caption)
        if not uri:
            dataset.skipped["no-uri"] += 1
        elif not caption:
            dataset.skipped["empty-caption"] += 1
        elif split and split not in SPLITS:
            dataset.skipped["unknown-split"] += 1
        else:
            dataset.rows.append(
                Row(uri, caption, SPLITS.get(split, ""), text_value(category[0]) or "" if category else "")
            )
    return dataset


def _table(source: Source) -> Dataset:
    dataset = Dataset(source.uri, "table", [])

    def items():
        for row in read_rows(source):
            if not isinstance(row, dict):
                if row is not None:
                    dataset.skipped["bad-row"] += 1
                continue
            uri = text_value(row.get("uri"))
            try:
                uri = resolve_uri(source, uri) if uri else None
            except ValueError:
                dataset.skipped["unsupported-uri"] += 1
                continue
            yield uri, row.get("caption"), (text_value(row.get("split")) or "").lower(), row.get("category")

    return _caption_rows(dataset, items())


def _flickr8k(source: Source) -> Dataset:
    fs, folder = source.fs, source.path
    names = {
        info.base_name: info.path
        for info in fs.get_file_info(pafs.FileSelector(folder, recursive=True))
        if info.is_file
    }
    if "Flickr8k.token.txt" in names:
        pairs = []
        for line in _lines(fs, names["Flickr8k.token.txt"]):
            image, _, caption = line.partition("\t")
            pairs.append((image.split("#")[0].strip(), caption))
    elif "captions.txt" in names:
        with fs.open_input_stream(names["captions.txt"]) as raw:
            reader = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", newline=""))
            pairs = [(row.get("image") or "", row.get("caption")) for row in reader]
    else:
        raise UsageError(f"data set {source.uri}: a Flickr8k folder has Flickr8k.token.txt or captions.txt")
    splits = {}
    for split in ("train", "dev", "test"):
        listing = next((path for name, path in names.items() if name.endswith(f"_8k.{split}Images.txt")), None)
        for image in _lines(fs, listing) if listing else []:
            splits[image.strip()] = split
    image_folder = _image_folder(source, [image for image, _ in pairs if image])
    dataset = Dataset(source.uri, "flickr8k", [])
    return _caption_rows(
        dataset,
        (
            (source.uri_of(f"{image_folder}/{image}") if image else None, caption, splits.get(image, ""))
            for image, caption in pairs
        ),
    )


def _image_folder(source: Source, images: list[str]) -> str:
    for candidate in IMAGE_FOLDERS:
        folder = posixpath.normpath(f"{source.path}/{candidate}")
        if images and source.fs.get_file_info(f"{folder}/{images[0]}").is_file:
            return folder
    raise UsageError(f"data set {source.uri}: no folder of images found ({', '.join(IMAGE_FOLDERS)})")


def _is_coco(source: Source) -> bool:
    if not source.path.lower().endswith(".json"):
        return False
    with source.fs.open_input_stream(source.path) as raw:
        head = raw.read(4096).decode("utf-8", "replace")
    return head.lstrip().startswith("{") and ('"annotations"' in head or '"images"' in head or '"info"' in head)


def _coco(source: Source, images: str | None) -> Dataset:
    with source.fs.open_input_stream(source.path) as raw:
        try:
            data = json.load(raw)
        except json.JSONDecodeError as exc:
            raise UsageError(f"data set {source.uri} is not valid JSON: {exc}") from None
    files = {image["id"]: image["file_name"] for image in data.get("images", []) if "id" in image}
    folder = _coco_images(source, images)
    dataset = Dataset(source.uri, "coco", [])
    return _caption_rows(
        dataset,
        (
            (f"{folder}/{files[a['image_id']]}" if a.get("image_id") in files else None, a.get("caption"), "")
            for a in data.get("annotations", [])
        ),
    )


def _coco_images(source: Source, images: str | None) -> str:
    if images:
        return images.rstrip("/")
    stem = posixpath.splitext(posixpath.basename(source.path))[0].removeprefix("captions_")
    here = posixpath.dirname(source.path)
    for folder in (f"{here}/{stem}", f"{posixpath.dirname(here)}/{stem}", f"{here}/images"):
        if source.fs.get_file_info(folder).type == pafs.FileType.Directory:
            return source.uri_of(folder)
    raise UsageError(f"data set {source.uri}: say where its images are with --images DIR")


def _lines(fs: pafs.FileSystem, path: str) -> list[str]:
    with fs.open_input_stream(path) as raw:
        return [line for line in raw.read().decode("utf-8", "replace").splitlines() if line.strip()]
