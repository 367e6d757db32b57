"""Searcher: what every front door holds to answer a query. The rules (BLEU parameters, reference kinds,
the query checks, how pictures re-rank), an index, and the pictures of the captioner's memory; a
query is planned once (its words, its k, its picture and how that ranks) and answered by one ranking.

cbir search and cbir web open one over the lake's whole index; each Spark task of the query job and of
cbir eval (jobs.search) holds one over its share of the captions and gives its candidates, which the job
ranks again with the same function (search.ranking.rank): every way of searching ranks alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from cbir.bleu import BleuParams
from cbir.errors import UsageError
from cbir.lake import Lake
from cbir.settings import Settings
from models import store
from search.cache import cached_index
from search.captioning import caption_image, describe_file
from search.duplicates import fold
from search.examples import SIDES, Example, Examples, check_examples, example_of, is_image_id
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
    example_weight: float = 0.5  # queries with examples: the share of likeness
    rocchio: tuple[float, float, float] = (1.0, 0.75, 0.25)  # the text's picture, the positives', the negatives'

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
            like.example_weight,
            tuple(like.rocchio),
        )

    @property
    def text_pictures(self) -> bool:
        return self.text_images > 0 and Likeness(self.text_weight, self.text_pool).on

    @property
    def image_pictures(self) -> bool:
        return Likeness(self.image_weight, self.image_pool).on

    def pictures(
        self, lake: Lake, version: str | None, by_text: bool = True, examples: bool = False
    ) -> Pictures | None:
        """The memory's pictures when a query may use them (not `by_text`: image queries only; `examples`:
        example images are projected into its space), else None."""
        if (by_text and self.text_pictures) or self.image_pictures or examples:
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
        examples: Examples | None = None,
    ) -> Plan:
        """A query's plan over an index of `images` images: a text query (no features) with the picture it
        borrows, an image query (its caption's words and its features) with its own, a query with examples
        (its text's words, maybe none) as search.examples says."""
        if examples:
            return self._by_examples(query_id, query, k, images, pictures, examples)
        picture, likeness = None, None
        if pictures is not None and features is None and self.text_pictures:
            picture = pictures.of_words(query, self.params)
            likeness = Likeness(self.text_weight, max(k, self.text_pool), images <= self.all_images)
        elif pictures is not None and features is not None and self.image_pictures:
            picture = pictures.of_features(features)
            likeness = Likeness(self.image_weight, k * self.image_pool)
        return Plan(query_id, query, k, picture, likeness if picture is not None else None)

    def _by_examples(
        self, query_id: str, query: list[str], k: int, images: int, pictures: Pictures | None, examples: Examples
    ) -> Plan:
        """Rocchio's picture, BLEU for the text and each positive's caption (search.examples); as for a text
        query, every image is compared with the picture in an index of at most likeness.all_images, the BLEU
        pools of the text and the captions in a larger one (a pass over every vector would take a second at 1M)."""
        texts = examples.texts(query)
        text_picture = pictures.of_words(query, self.params) if query and pictures is not None else None
        picture = examples.picture(text_picture, self.rocchio)
        likeness = Likeness(self.example_weight, max(k, self.text_pool), images <= self.all_images)
        names, likes = examples.likes()
        return Plan(
            query_id,
            list(texts[0]) if texts else [],
            k,
            picture,
            likeness if picture is not None else None,
            tuple(texts[1:]),
            names,
            likes,
            examples.excluded(),
        )


@dataclass(frozen=True)
class Plan:
    """One query as the ranking asks it (words and k alone: by BLEU). A query with examples also has the
    positives' captions (`also`, searched beside its words), the positives' names and vectors (`likes`: which
    one a hit resembles) and the negatives' images (`excluded`)."""

    query_id: str
    words: list[str]
    k: int
    picture: np.ndarray | None = None
    likeness: Likeness | None = None
    also: tuple[tuple[str, ...], ...] = ()
    names: tuple[str, ...] = ()
    likes: np.ndarray | None = None
    excluded: frozenset[str] = frozenset()

    def example(self, resembles: int) -> str | None:
        """The name of the positive a hit resembles most (-1: none)."""
        return self.names[resembles] if resembles >= 0 else None


class Searcher:
    """An index, the rules and the memory's pictures: a query's plan, and its top k."""

    def __init__(self, index: Index, rules: Rules, pictures: Pictures | None = None):
        self.index, self.rules, self.pictures = index, rules, pictures

    @classmethod
    def open(
        cls,
        lake: Lake,
        settings: Settings,
        version: str | None,
        extra: tuple[str, ...] = (),
        by_text: bool = True,
        by_examples: bool = False,
    ) -> Searcher:
        """The searcher of this captioner version's captions in the lake: the index from the cache (or built
        and saved), and the memory's pictures when a query may use them (not `by_text`: image queries only;
        `by_examples`: example files are projected into its space)."""
        rules = Rules.from_settings(settings)
        index = cached_index(lake, settings.state_dir, version, rules.kinds, rules.params.max_order, extra)
        pictures = rules.pictures(lake, version, by_text, by_examples) if index.visual is not None else None
        return cls(index, rules, pictures)

    def __len__(self) -> int:
        return len(self.index)

    def plan(self, query_id: str, query: list[str], k: int, features=None, examples: Examples | None = None) -> Plan:
        return self.rules.plan(query_id, query, k, len(self.index), self.pictures, features, examples)

    def examples(
        self, positive: list[str], negative: list[str], describe: Callable[[str], tuple] | None = None
    ) -> tuple[Examples, list[str]]:
        """Examples by name: an image id of this index by its caption and stored likeness vector, any other
        name by describe(name) -> (caption, features, image_id), which raises UsageError for an image that
        cannot be used; (the examples, a line for each one left out: which and why)."""
        found, failures = {}, []
        for side, names in zip(SIDES, (positive, negative)):
            for name in names:
                try:
                    found[side, name] = self._example(name, describe)
                except UsageError as exc:
                    shown = name if len(name) <= 200 else f"{name[:200]}..."
                    failures.append(f"{side} example {shown}: {exc}")
        return Examples(*(tuple(e for (s, _), e in found.items() if s == side) for side in SIDES)), failures

    def _example(self, name: str, describe) -> Example:
        if self.index.visual is None:
            raise UsageError("example images need likeness vectors: reindex with `cbir index`")
        row = self.index.row_of.get(name)
        if row is not None:
            return example_of(name, self.index.table.column("caption")[row].as_py(), self.index.visual[row], name)
        if describe is None or is_image_id(name):
            raise UsageError("not-found: no indexed image has this id")
        if self.pictures is None:  # a file's features are projected into the memory's space
            raise UsageError("example files need the captioner's memory: train with train.memory_images above 0")
        caption, features, image_id = describe(name)
        return example_of(name, caption, self.pictures.of_features(features), image_id)

    def candidates(self, plan: Plan) -> list[Candidate]:
        """The plan's candidates in this index (a Spark task's share of a query), each with its row."""
        return self.index.candidates(plan, self.rules.params)

    def search(self, plan: Plan) -> list[dict]:
        """The plan's top k, best first: rank, image_id, uri, caption, score (BLEU, or its blend with the
        likeness to the picture), matched_kind and matched_text of each, and the example it resembles."""
        ranked = rank(self.candidates(plan), plan.k, plan.likeness)
        shown = self.index.shown(plan.words, [c.row for _, c in ranked], self.rules.params)
        return [
            dict(rank=n, score=score, **hit, example=plan.example(c.resembles))
            for n, ((score, c), hit) in enumerate(zip(ranked, shown), start=1)
        ]


def folded(index: Index, hits: list[dict], threshold: float) -> list[dict]:
    """The hits with each near-duplicate folded under the first higher-ranked hit it copies (search.duplicates):
    each kept hit has a `folded` list."""
    vectors = [None if index.visual is None else index.visual[index.row_of[hit["image_id"]]] for hit in hits]
    return fold(hits, vectors, threshold)


def search_one(
    lake: Lake,
    settings: Settings,
    k: int,
    text: str | None = None,
    image: str | None = None,
    like: tuple[str, ...] = (),
    unlike: tuple[str, ...] = (),
) -> tuple[str | None, list[dict], list[str]]:
    """One query by text, by an image, or by example images (with or without text), in this process (cbir
    search): (the image's caption, or None; its top k, each with its rank; a line per example left out)."""
    rules = Rules.from_settings(settings)
    card = store.card(lake, settings.captioner.version)
    caption, features = caption_image(lake, settings, card, image) if image is not None else (None, None)
    if caption is not None:
        query = rules.words(caption, "the caption of the query image")
    else:  # examples alone search for their positives' captions
        query = rules.words(text) if text is not None or not like else []
    searcher = Searcher.open(lake, settings, card["version"], by_text=image is None, by_examples=bool(like or unlike))
    examples, failures = None, []
    if like or unlike:
        check_examples(like, unlike, settings.query.max_examples, has_text=text is not None)
        examples, failures = searcher.examples(list(like), list(unlike), partial(describe_file, lake, settings, card))
        if text is None and not examples.positive:
            raise UsageError("no positive example could be used: " + "; ".join(failures))
    return caption, searcher.search(searcher.plan("query", query, k, features, examples)), failures


def bleu_plans(queries) -> list[Plan]:
    """Plans by BLEU alone for search.queries.Query objects (text, or an image's caption)."""
    return [Plan(q.query_id, q.words, q.k) for q in queries]
