"""Ranking: BLEU, blended with likeness to the query's picture where it has one.

A query's picture is a unit vector in the space of the images' stored likeness vectors: borrowed from
the captioner's memory for a text query (search.pictures), or the query image's own for an image query
with `likeness.image`. Its `Likeness` says how it re-ranks: the top `pool` images by BLEU rank by
weight * cosine + (1 - weight) * BLEU; with `everyone` (a small index), any other image ranks by
weight * cosine alone.

`rank` is the one function that orders candidates: `cbir search` and `cbir web` call it on their whole
index, each Spark task of the query job on its share, and the job again on every task's candidates of
a query, so each front door ranks alike.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Likeness:
    """How a picture re-ranks a query's BLEU pool (see the module's docstring)."""

    weight: float
    pool: int
    everyone: bool = False

    @property
    def on(self) -> bool:
        return self.weight > 0 and self.pool > 0


@dataclass(frozen=True)
class Candidate:
    """An image a query may rank: its BLEU, its cosine with the picture (None: no picture), and where its
    holder keeps it (`row`: of an index, or of the query job's candidates), carried along untouched."""

    image_id: str
    bleu: float
    cosine: float | None = None
    row: int = -1
    resembles: int = -1  # the positive example it is most like (search.examples), -1: none


def rank(candidates: Iterable[Candidate], k: int, likeness: Likeness | None) -> list[tuple[float, Candidate]]:
    """The top k as (score, candidate), best first, ties by image_id. Without likeness the score is the BLEU.
    With it, the pool is the top likeness.pool candidates by BLEU (ties by image_id, BLEU above zero); an image
    without a likeness vector (cosine None) counts as unlike the picture, as its zero vector is."""
    candidates = list(candidates)
    if likeness is None or all(c.cosine is None for c in candidates):  # no picture, or no vectors to compare
        scored = [(c.bleu, c) for c in candidates]
    else:
        by_bleu = sorted((c for c in candidates if c.bleu > 0), key=lambda c: (-c.bleu, c.image_id))
        pool = {c.image_id for c in by_bleu[: likeness.pool]}
        w = likeness.weight
        scored = [
            (w * (c.cosine or 0.0) + (1 - w) * c.bleu if c.image_id in pool else w * (c.cosine or 0.0), c)
            for c in candidates
            if c.image_id in pool or likeness.everyone
        ]
    scored.sort(key=lambda item: (-item[0], item[1].image_id))
    return scored[:k]


def cosines(vectors: np.ndarray, picture: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Cosines of the (unit, float16) vectors with the picture, the same whichever rows are computed together
    (a Spark task holds some, the web app all): exact float64 products, summed, rounded to float32; float32
    sums in BLAS vary with the rows' layout in the last bit, which would break ties differently."""
    picture = np.asarray(picture, np.float64)
    out = np.empty(len(vectors), np.float32)
    for start in range(0, len(vectors), chunk):
        out[start : start + chunk] = vectors[start : start + chunk].astype(np.float64) @ picture
    return out.astype(np.float64)


def top(values: np.ndarray, n: int) -> np.ndarray:
    """The indices of the n largest values (unordered)."""
    return np.arange(len(values)) if n >= len(values) else np.argpartition(-values, n - 1)[:n]
