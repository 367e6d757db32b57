"""BLEU between a query and an image's texts, exactly as nltk's sentence_bleu computes it.

score(query, image) = sentence_bleu(references=the image's texts, hypothesis=the query, ...).
For one query every image's score depends only on its clipped n-gram matches per order and
its closest reference length, so `score` takes those counts and repeats nltk's arithmetic step
for step (the same float divisions, math.log, math.fsum, math.exp), which makes the result
bit-for-bit nltk's. The ranking engine (cbir.engine) finds the counts without a per-pair loop.

nltk's quirks kept on purpose: a query with no unigram match scores 0 before any smoothing;
method1 divides epsilon by the query's n-gram count; method2 leaves unigrams alone; method3's
exponent counts the empty orders in turn; auto_reweigh applies only to the default weights.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

DEFAULT_WEIGHTS = (0.25, 0.25, 0.25, 0.25)
SMOOTHINGS = ("method0", "method1", "method2", "method3")
EPSILON = 0.1  # nltk's SmoothingFunction default, used by method1


@dataclass(frozen=True)
class BleuParams:
    weights: tuple[float, ...] = DEFAULT_WEIGHTS
    smoothing: str = "method1"
    auto_reweigh: bool = True

    def __post_init__(self):
        if self.smoothing not in SMOOTHINGS:
            raise ValueError(f"smoothing is one of {', '.join(SMOOTHINGS)}, not {self.smoothing}")
        if not self.weights or any(w < 0 for w in self.weights):
            raise ValueError("weights are one or more non-negative numbers")

    @property
    def max_order(self) -> int:
        return len(self.weights)


def denominators(query_length: int, max_order: int) -> tuple[int, ...]:
    """The query's n-gram count per order, at least 1 (nltk's modified_precision denominator)."""
    return tuple(max(1, query_length - n + 1) for n in range(1, max_order + 1))


@lru_cache(maxsize=1 << 16)  # few distinct arguments: hits show the texts that matched by it
def score(matches: tuple[int, ...], query_length: int, ref_length: int, params: BleuParams) -> float:
    """nltk's sentence_bleu from the clipped matches per order (1..max_order) and the closest reference length."""
    if matches[0] == 0:
        return 0
    dens = denominators(query_length, params.max_order)
    p_n = _smooth(matches, dens, params.smoothing)
    weights = params.weights
    if params.auto_reweigh and query_length < 4 and weights == DEFAULT_WEIGHTS:
        weights = (1 / query_length,) * query_length
    if query_length > ref_length:
        bp = 1
    else:  # query_length == 0 never gets here: it has no unigram match
        bp = math.exp(1 - ref_length / query_length)
    return bp * math.exp(math.fsum(w * math.log(p) for w, p in zip(weights, p_n) if p > 0))


def _smooth(matches, dens, smoothing: str) -> list[float]:
    """The precisions as the floats nltk's Fractions and smoothing functions turn into."""
    if smoothing == "method0":
        return [m / d if m else sys.float_info.min for m, d in zip(matches, dens)]
    if smoothing == "method1":
        return [m / d if m else (m + EPSILON) / d for m, d in zip(matches, dens)]
    if smoothing == "method2":
        return [matches[0] / dens[0]] + [(m + 1) / (d + 1) for m, d in zip(matches[1:], dens[1:])]
    p_n, empty = [], 1  # method3
    for m, d in zip(matches, dens):
        if m:
            p_n.append(m / d)
        else:
            p_n.append(1 / (2**empty * d))
            empty += 1
    return p_n


def matches(query: list[str], references: list[list[str]], max_order: int) -> tuple[int, ...]:
    """Clipped n-gram matches per order: the slow, obvious way (for tests and tiny inputs)."""
    out = []
    for n in range(1, max_order + 1):
        wanted = Counter(tuple(query[i : i + n]) for i in range(len(query) - n + 1))
        best: dict = {}
        for reference in references:
            have = Counter(tuple(reference[i : i + n]) for i in range(len(reference) - n + 1))
            for gram in wanted:
                best[gram] = max(best.get(gram, 0), have[gram])
        out.append(sum(min(count, best[gram]) for gram, count in wanted.items()))
    return tuple(out)
