"""Queries by example: "more like these, not like those". A query may carry positive and negative example
images (with or without text); each example is an image of the lake (its image_id) or an image file, and
counts by its caption and its likeness vector (in the space of the images' stored likeness vectors).

How they rank (search.searcher.Rules.plan): the query's picture moves toward the positives and away from
the negatives (Rocchio: a x the text's picture + b x the positives' mean - c x the negatives' mean,
likeness.rocchio), every image is compared with it (in an index of at most likeness.all_images; a larger one
re-ranks the BLEU pools, as for a text query), the positives' captions are searched for beside the text (an
image's BLEU is its best against any of them), and the negatives themselves are not results. Each result
names the positive it resembles most.

Every front door resolves its examples to `Example`s (image ids from the index or the captions table, files
captioned as image queries are) and plans them here, so query files, cbir search and cbir web rank alike.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from cbir.lake import IMAGE_ID
from cbir.text import words
from search.rules import QueryRefused

SIDES = ("positive", "negative")


@dataclass(frozen=True)
class Example:
    """An example image as a query uses it: its name (as the user gave it), its caption's words and its
    likeness vector (unit; None: no vector of the index's space)."""

    name: str
    words: tuple[str, ...]
    vector: np.ndarray | None
    image_id: str | None = None


@dataclass(frozen=True)
class Examples:
    positive: tuple[Example, ...] = ()
    negative: tuple[Example, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.positive or self.negative)

    def picture(self, text_picture: np.ndarray | None, weights: tuple[float, float, float]) -> np.ndarray | None:
        """Rocchio's query: a x the text's picture + b x the positives' mean - c x the negatives' mean, unit
        length; None when no example has a vector and there is no text picture."""
        if text_picture is None and not any(e.vector is not None for e in self.positive):
            return None  # negatives alone point nowhere
        a, b, c = weights
        parts = [a * np.asarray(text_picture, np.float64)] if text_picture is not None else []
        for weight, side in ((b, self.positive), (-c, self.negative)):
            vectors = [e.vector for e in side if e.vector is not None]
            if vectors:
                parts.append(weight * np.mean(np.asarray(vectors, np.float64), axis=0))
        query = np.sum(parts, axis=0)
        norm = np.linalg.norm(query)
        return None if norm < 1e-12 else (query / norm).astype(np.float32)

    def texts(self, text_words: list[str] | None) -> list[tuple[str, ...]]:
        """The word lists searched by BLEU: the text's, then each positive's caption (once each)."""
        found = [tuple(text_words)] if text_words else []
        found += [e.words for e in self.positive if e.words]
        return list(dict.fromkeys(found))

    def likes(self) -> tuple[tuple[str, ...], np.ndarray | None]:
        """The positives with a vector: (their names, their vectors (p, d)), to tell which one a hit resembles."""
        named = [(e.name, e.vector) for e in self.positive if e.vector is not None]
        if not named:
            return (), None
        return tuple(name for name, _ in named), np.asarray([v for _, v in named], np.float32)

    def excluded(self) -> frozenset[str]:
        """The negatives' own images: never results."""
        return frozenset(e.image_id for e in self.negative if e.image_id)


def example_refs(value, what: str) -> list[str]:
    """A query row's `positive` or `negative` value as a list of names: a list (JSONL, Parquet), a JSON array
    written in a CSV cell, or names separated by `|`; empty or missing: none."""
    if value is None or (isinstance(value, float) and value != value):
        return []
    if isinstance(value, str):
        value = value.strip()
        if value.startswith("["):
            try:
                value = json.loads(value)
            except ValueError:
                raise QueryRefused("bad-row", f"{what}: not a JSON list of images") from None
        else:
            value = value.split("|")
    if not isinstance(value, list | tuple) and not hasattr(value, "tolist"):
        raise QueryRefused("bad-row", f"{what}: expected a list of images")
    names = list(value.tolist() if hasattr(value, "tolist") else value)
    if not all(isinstance(name, str) for name in names):
        raise QueryRefused("bad-row", f"{what}: every example must be a path, a URI or an image id")
    return [name.strip() for name in names if name.strip()]


def check_examples(positive: Iterable[str], negative: Iterable[str], limit: int, has_text: bool) -> None:
    """The rules every query with examples meets: at most `limit` in all, no image on both sides, and a
    negative needs text or a positive to move away from."""
    positive, negative = list(positive), list(negative)
    if len(positive) + len(negative) > limit:
        raise QueryRefused(
            "too-many-examples",
            f"the query has {len(positive) + len(negative)} example images, over query.max_examples={limit}",
        )
    if both := sorted(set(positive) & set(negative)):
        raise QueryRefused("bad-examples", f"{both[0]} is both a positive and a negative example")
    if negative and not positive and not has_text:
        raise QueryRefused("bad-examples", "negative examples need a text or a positive example to move away from")


def is_image_id(name: str) -> bool:
    return IMAGE_ID.fullmatch(name) is not None


def example_of(name: str, caption: str | None, vector, image_id: str | None = None) -> Example:
    """An example from its caption and its likeness vector (None: none)."""
    vector = None if vector is None else np.asarray(vector, np.float32)
    if vector is not None and not (np.isfinite(vector).all() and np.linalg.norm(vector) > 1e-6):
        vector = None  # an image without a stored vector has zeros
    return Example(name, tuple(words(caption)), vector, image_id)
