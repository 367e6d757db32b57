"""Searcher: what every front door holds to answer a query. The rules (BLEU parameters, reference kinds,
the query checks, how pictures re-rank), an index, and the pictures of the captioner's memory; a
query is planned once (its words, its k, its picture and how that ranks) and answered by one ranking.

cbir search and cbir web open one over the lake's whole index; each Spark task of the query job and of
cbir eval (jobs.search) holds one over its share of the captions and gives its candidates, which the job
ranks again with the same function (search.ranking.rank): every way of searching ranks alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cbir.bleu import BleuParams
from cbir.lake import Lake
from cbir.settings import Settings
from models import store
from search.cache import cached_index
from search.captioning import caption_image
from search.index import Index, bleu_params
from search.pictures import Pictures, load_pictures
from search.ranking import Candidate, Likeness, rank
from search.rules import query_words


@dataclass(frozen=True)
class Rules:
    """How queries are checked and ranked, from the settings: a text query re-ranks its BLEU pool by the
    picture it borrows from the memory (likeness.text_*); with likeness.image, an image query by its own."""

    params: BleuParams
    kinds: tuple[str, ...]
    max_words: int = 100
    text_images: int = 0
    text_weight: float = 0.0
    text_pool: int = 0
    all_images: int = 0  # an index this small ranks every image by likeness too: words miss many targets
    image_weight: float = 0.0  # 0: image queries rank by BLEU alone
    image_pool: int = 0  # per result

    @classmethod
    def from_settings(cls, settings: Settings) -> Rules:
        like = settings.likeness
        return cls(
            bleu_params(settings),
            tuple(settings.bleu.references),
            settings.query.max_words,
            like.text_images,
            like.text_weight,
            like.text_pool,
            like.all_images,
            like.image_weight if like.image else 0.0,
            like.image_pool if like.image else 0,
        )

    @property
    def text_pictures(self) -> bool:
        return self.text_images > 0 and Likeness(self.text_weight, self.text_pool).on

    @property
    def image_pictures(self) -> bool:
        return Likeness(self.image_weight, self.image_pool).on

    def pictures(self, lake: Lake, version: str | None, by_text: bool = True) -> Pictures | None:
        """The memory's pictures when a query may use them (not `by_text`: image queries only), else None."""
        if (by_text and self.text_pictures) or self.image_pictures:
            return load_pictures(lake, version, self.text_images, self.params.max_order)
        return None

    def words(self, text: str | None, what: str = "the query") -> list[str]:
        """The words of a text query, checked (search.rules)."""
        return query_words(text, self.max_words, what)

    def plan(
        self,
        query_id: str,
        query: list[str],
        k: int,
        images: int,
        pictures: Pictures | None,
        features=None,
    ) -> Plan:
        """A query's plan over an index of `images` images: a text query (no features) with the picture it
        borrows, an image query (its caption's words and its features) with its own."""
        picture, likeness = None, None
        if pictures is not None and features is None and self.text_pictures:
            picture = pictures.of_words(query, self.params)
            likeness = Likeness(self.text_weight, max(k, self.text_pool), images <= self.all_images)
        elif pictures is not None and features is not None and self.image_pictures:
            picture = pictures.of_features(features)
            likeness = Likeness(self.image_weight, k * self.image_pool)
        return Plan(query_id, query, k, picture, likeness if picture is not None else None)


@dataclass(frozen=True)
class Plan:
    """One query as the ranking asks it (words and k alone: by BLEU)."""

    query_id: str
    words: list[str]
    k: int
    picture: np.ndarray | None = None
    likeness: Likeness | None = None


class Searcher:
    """An index, the rules and the memory's pictures: a query's plan, and its top k."""

    def __init__(self, index: Index, rules: Rules, pictures: Pictures | None = None):
        self.index, self.rules, self.pictures = index, rules, pictures

    @classmethod
    def open(
        cls, lake: Lake, settings: Settings, version: str | None, extra: tuple[str, ...] = (), by_text: bool = True
    ) -> Searcher:
        """The searcher of this captioner version's captions in the lake: the index from the cache (or built
        and saved), and the memory's pictures when a query may use them (not `by_text`: image queries only)."""
        rules = Rules.from_settings(settings)
        index = cached_index(lake, settings.state_dir, version, rules.kinds, rules.params.max_order, extra)
        pictures = rules.pictures(lake, version, by_text) if index.visual is not None else None
        return cls(index, rules, pictures)

    def __len__(self) -> int:
        return len(self.index)

    def plan(self, query_id: str, query: list[str], k: int, features=None) -> Plan:
        return self.rules.plan(query_id, query, k, len(self.index), self.pictures, features)

    def candidates(self, plan: Plan) -> list[Candidate]:
        """The plan's candidates in this index (a Spark task's share of a query), each with its row."""
        return self.index.candidates(plan.words, plan.k, self.rules.params, plan.picture, plan.likeness)

    def search(self, plan: Plan) -> list[dict]:
        """The plan's top k, best first: rank, image_id, uri, caption, score (BLEU, or its blend with the
        likeness to the picture), matched_kind and matched_text of each."""
        ranked = rank(self.candidates(plan), plan.k, plan.likeness)
        shown = self.index.shown(plan.words, [c.row for _, c in ranked], self.rules.params)
        return [dict(rank=n, score=score, **hit) for n, ((score, _), hit) in enumerate(zip(ranked, shown), start=1)]


def search_one(
    lake: Lake, settings: Settings, k: int, text: str | None = None, image: str | None = None
) -> tuple[str | None, list[dict]]:
    """One query by text or by example image, in this process (cbir search): (the image's caption, or None;
    its top k, each with its rank)."""
    rules = Rules.from_settings(settings)
    card = store.card(lake, settings.captioner.version)
    caption, features = caption_image(lake, settings, card, image) if image is not None else (None, None)
    query = rules.words(text) if caption is None else rules.words(caption, "the caption of the query image")
    searcher = Searcher.open(lake, settings, card["version"], by_text=image is None)
    return caption, searcher.search(searcher.plan("query", query, k, features))


def bleu_plans(queries) -> list[Plan]:
    """Plans by BLEU alone for search.queries.Query objects (text, or an image's caption)."""
    return [Plan(q.query_id, q.words, q.k) for q in queries]
