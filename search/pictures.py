"""A picture for a query: a unit vector in the space of the images' stored likeness vectors (the captioner
memory's). A text query borrows one from the memory (the remembered images whose texts match its words,
models.neighbours.Prototypes); an image query has its own, its features projected into that space. The
ranking (search.ranking) re-ranks a query's BLEU pool by likeness to its picture."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from cbir.bleu import BleuParams
from cbir.errors import UsageError
from cbir.lake import Lake
from models import store
from models.neighbours import Memory, Prototypes

log = logging.getLogger("cbir.search")


@dataclass(frozen=True)
class Pictures:
    """The memory of a captioner version, and the prototypes text queries borrow from (None: off)."""

    memory: Memory
    prototypes: Prototypes | None

    def of_words(self, query: list[str], params: BleuParams) -> np.ndarray | None:
        """A text query's picture; None when no remembered text shares a word with it."""
        return None if self.prototypes is None else self.prototypes.picture(query, params)

    def of_features(self, features) -> np.ndarray | None:
        """An image query's picture: its features in the memory's space (None: features of another encoder)."""
        features = np.asarray(features, np.float32)
        if features.shape != (self.memory.feature_dim,):
            return None
        return self.memory.project(features[None])[0]


def load_pictures(lake: Lake, version: str | None, text_images: int, max_order: int) -> Pictures | None:
    """The pictures of this captioner version's memory; None when it has none, the lake holds captions but
    not their captioner (a copied table), or its memory.npz is refused (damaged or foreign: one warning)."""
    if version is None:
        return None
    try:
        card = store.card(lake, version)
    except UsageError:
        return None
    try:
        memory = store.load_memory(lake, card)
    except UsageError as exc:  # a damaged or foreign memory: say so once, and rank by BLEU alone
        log.warning("%s: queries are ranked without pictures", exc)
        return None
    if memory is None:
        return None
    prototypes = Prototypes.of(memory, text_images, max_order) if text_images > 0 else None
    return Pictures(memory, prototypes)
