"""Exact BLEU top-k over many captions without a per-pair loop.

Build: every image's texts become integer n-gram codes (1..max_order), numbered densely per order
in code order; for each n-gram the postings list of images that contain it, and for each image its
n-gram ids ascending, each repeated as often as the image has it (the most any one of its texts
has: BLEU clips against the best reference).

Query (MaxScore pruning): the query's n-grams' lists are read one by one. An image is scored in
full (its sorted grams merged with the query's) the first time one of its lists is read. Before
each list, a bound is computed on the score of any image that only the unread lists could still
bring, taking every unread match as granted and no brevity penalty; once the k-th best score
beats that bound, no unread image can enter the top k, so the long postings of words like "a"
and "the" are seldom read at all. Lists are read in the order that lowers the bound the most per
posting, and the rows of upcoming candidates are prefetched, since the scan waits on memory.

The loop computes scores in floating point with a small margin; the final top k, ties by
image_id ascending, are then scored with cbir.bleu.score, which is nltk's arithmetic exactly.
"""

from __future__ import annotations

import math
import os
import queue
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from llvmlite import ir
from numba import float64, int64, njit, types
from numba.core import cgutils
from numba.experimental import jitclass
from numba.extending import intrinsic

from cbir.bleu import SMOOTHINGS, BleuParams, denominators, score
from cbir.text import words_array

AHEAD = 8  # postings
RADIX_BITS = 16
RADIX_MASK = (1 << RADIX_BITS) - 1
CHECK_CHUNK = 1 << 18  # values per step when a loaded index is checked: each chunk is read once, from the cache
MARGIN = 1e-9  # relative: far above float rounding, far below any real difference between scores
SMOOTHING_CODES = {"method0": 0, "method1": 1, "method2": 2, "method3": 3}


@dataclass
class Hit:
    image_id: str
    score: float


class BleuIndex:
    """An immutable index over images' texts: each image has one or more texts, each a list of words."""

    @classmethod
    def from_captions(cls, image_ids: list[str], captions, max_order: int = 4) -> BleuIndex:
        """One caption string per image, split into words as the captioner's tokenizer does."""
        return cls(image_ids, words_array(captions), None, max_order)

    @classmethod
    def from_texts(cls, image_ids: list[str], texts: list[list[list[str]]], max_order: int = 4) -> BleuIndex:
        """Word lists: texts[i] are image i's texts (none counts as one empty text)."""
        if len(image_ids) != len(texts):
            raise ValueError("one list of texts per image")
        refs = pa.array([ref for image_refs in texts for ref in (image_refs or [[]])], pa.list_(pa.string()))
        return cls(image_ids, refs, np.array([max(len(image_refs), 1) for image_refs in texts], np.int64), max_order)

    def __init__(
        self, image_ids: list[str], refs: pa.ListArray, refs_per_image: np.ndarray | None = None, max_order: int = 4
    ):
        """refs: word lists grouped by image, in image_ids order; refs_per_image: how many each (default 1)."""
        refs_per_image = np.ones(len(image_ids), np.int64) if refs_per_image is None else refs_per_image
        if len(refs_per_image) != len(image_ids) or refs_per_image.sum() != len(refs):
            raise ValueError("the texts do not match the images")
        self.max_order = max_order
        self._spare: queue.SimpleQueue = queue.SimpleQueue()
        # Images are numbered by (shortest text, image_id): each postings list then runs from short
        # texts to long ones, and the brevity penalty lets a scan stop early. id_rank breaks ties.
        ref_lens = np.diff(refs.offsets.to_numpy())
        first_ref = np.concatenate([[0], np.cumsum(refs_per_image)[:-1]])
        shortest = np.minimum.reduceat(ref_lens, first_ref) if len(image_ids) else ref_lens
        id_rank = np.empty(len(image_ids), np.int64)
        id_rank[pc.sort_indices(pa.array(image_ids, pa.string())).to_numpy()] = np.arange(len(image_ids))
        order = np.lexsort((id_rank, shortest))
        self.image_ids = [image_ids[i] for i in order]
        self.id_rank = id_rank[order]
        # Texts in image order; words as vocabulary ids (dictionary encoding runs in Arrow, not Python).
        counts = refs_per_image[order]
        group_start = np.cumsum(counts) - counts
        ref_order = np.arange(counts.sum()) - np.repeat(group_start, counts) + np.repeat(first_ref[order], counts)
        refs = refs.take(pa.array(ref_order, pa.int64()))
        words = pc.dictionary_encode(refs.flatten())
        self.vocabulary = {word: i for i, word in enumerate(words.dictionary.to_pylist())}
        tokens = words.indices.to_numpy().astype(np.int64)
        ref_offsets = refs.offsets.to_numpy().astype(np.int64) - refs.offsets[0].as_py()
        ref_image = np.repeat(np.arange(len(image_ids)), refs_per_image[order])
        self.base = max(len(self.vocabulary), 1)
        n_images = len(self.image_ids)
        self.ref_lens = np.diff(ref_offsets)  # refs are grouped by image, in image order

        # The code of the n-gram starting at each position (-1 where it runs past its text):
        # the (n-1)-gram's code times the vocabulary size plus the next word. When that would
        # overflow, the (n-1)-gram codes are first replaced by their rank among that order's codes.
        self.renumbered = np.zeros(max_order, np.bool_)
        by_order = [tokens]
        for n in range(2, max_order + 1):
            position_codes = by_order[-1]
            if position_codes.max(initial=0) >= 2**62 // self.base:
                valid = position_codes >= 0
                position_codes = position_codes.copy()
                position_codes[valid] = np.unique(position_codes[valid], return_inverse=True)[1]
                self.renumbered[n - 2] = True
            by_order.append(_extend(position_codes, tokens, ref_offsets, n, self.base))

        # The orders are independent from here: their kernels release the GIL and run side by side.
        with ThreadPoolExecutor(min(max_order, os.cpu_count() or 1)) as pool:  # longest first
            orders = list(
                pool.map(
                    _Order.build,
                    range(max_order, 0, -1),
                    by_order[::-1],
                    repeat(ref_offsets),
                    repeat(ref_image),
                    repeat(self.base),
                )
            )[::-1]
        del by_order
        # Gram ids are global: order n's ids follow order n-1's, so an id tells its order.
        self.codes = np.concatenate([o.codes for o in orders])
        self.code_offsets = np.cumsum([0] + [len(o.codes) for o in orders])
        entries = np.cumsum([0] + [len(o.image) for o in orders])
        self.post_offsets = np.concatenate(
            [o.post_offsets[:-1] + at for o, at in zip(orders, entries)] + [entries[-1:]]
        )
        self.post_images = np.concatenate([o.post_images for o in orders])
        self.fwd_gids, fwd_offsets = _forward(
            tuple(o.image for o in orders),
            tuple(o.gid for o in orders),
            tuple(o.count for o in orders),
            self.code_offsets,
            n_images,
        )
        del orders
        # What a candidate needs, side by side: where its grams start, id_rank, shortest text length,
        # where its text lengths start; the next row closes its ranges (row n_images the last ones).
        self.meta = np.zeros((n_images + 1, 4), np.int64)
        self.meta[:, 0] = fwd_offsets
        self.meta[:-1, 1], self.meta[:-1, 2] = self.id_rank, shortest[order]
        self.meta[1:, 3] = np.cumsum(counts)

    # What the index is, to save and load it again (search/cache.py): arrays, the image ids in
    # engine order and the vocabulary in id order. A loaded index answers exactly as the built one.
    ARRAYS = ("id_rank", "ref_lens", "renumbered", "codes", "code_offsets", "post_offsets", "post_images", "fwd_gids")
    ARRAYS_2D = ("meta",)

    def state(self) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
        """(name -> array, image ids in engine order, vocabulary words in id order)."""
        arrays = {name: getattr(self, name) for name in (*self.ARRAYS, *self.ARRAYS_2D)}
        return arrays, self.image_ids, list(self.vocabulary)

    @classmethod
    def from_state(
        cls, arrays: dict[str, np.ndarray], image_ids: list[str], vocabulary: list[str], max_order: int
    ) -> BleuIndex:
        """The index that state() described; ValueError when the pieces do not fit together."""
        if type(max_order) is not int or max_order < 1:
            raise ValueError(f"max_order is {max_order!r}")
        index = cls.__new__(cls)
        index.max_order = max_order
        index._spare = queue.SimpleQueue()
        index.image_ids = image_ids
        index.vocabulary = {word: i for i, word in enumerate(vocabulary)}
        index.base = max(len(index.vocabulary), 1)
        for name in (*cls.ARRAYS, *cls.ARRAYS_2D):
            setattr(index, name, arrays[name])
        if len(index.vocabulary) != len(vocabulary):
            raise ValueError("the vocabulary has a word twice")
        index._check()
        index._check_values()
        return index

    def _check(self) -> None:
        n, grams = len(self.image_ids), int(self.code_offsets[-1]) if len(self.code_offsets) else -1
        wanted = {
            "id_rank": (np.int64, (n,)),
            "ref_lens": (np.int64, (int(self.meta[-1, 3]) if self.meta.ndim == 2 and len(self.meta) else -1,)),
            "renumbered": (np.bool_, (self.max_order,)),
            "codes": (np.int64, (grams,)),
            "code_offsets": (np.int64, (self.max_order + 1,)),
            "post_offsets": (np.int64, (grams + 1,)),
            "post_images": (np.int32, (int(self.post_offsets[-1]) if len(self.post_offsets) else -1,)),
            "fwd_gids": (np.int32, (int(self.meta[-1, 0]) if self.meta.ndim == 2 and len(self.meta) else -1,)),
            "meta": (np.int64, (n + 1, 4)),
        }
        for name, (dtype, shape) in wanted.items():
            array = getattr(self, name)
            if array.dtype != dtype or array.shape != shape:
                raise ValueError(f"{name}: {array.dtype}{array.shape}, expected {np.dtype(dtype)}{shape}")

    def _check_values(self) -> None:
        """What the kernels take on trust, since they index without bounds checks, checked on the values
        (_check checked the shapes): each offsets array starts at 0 and never falls, so with those shapes
        every range lies in its array (a gram's postings, an image's grams, an image's texts); every image
        number in a postings list is below the number of images (it indexes meta, the scratch flags, id_rank
        and image_ids); and a gram has postings (its list's length divides). Then two cheap relations that
        would give wrong answers: the single words' codes are the vocabulary's ids, and id_rank (meta[:, 1]
        holds a copy) is a permutation. Vectorised, a chunk at a time: about 0.2 s for a million images
        with ten texts each (fwd_gids, ref_lens and the longer grams' codes index nothing: they are not read)."""
        n, meta = len(self.image_ids), self.meta
        _rising("code_offsets", self.code_offsets)
        _rising("post_offsets", self.post_offsets, strictly=len(self.vocabulary) > 0)  # no words: one empty gram
        _rising("meta[:, 0] (the grams' offsets)", meta[:, 0])
        _rising("meta[:, 3] (the texts' offsets)", meta[:, 3], strictly=True)  # every image has a text
        _below("post_images", self.post_images, n)
        _below("id_rank", self.id_rank, n)
        if n and (np.bincount(self.id_rank, minlength=n).max() != 1 or not np.array_equal(meta[:-1, 1], self.id_rank)):
            raise ValueError("id_rank is not a permutation, or meta[:, 1] is not id_rank")
        if self.code_offsets[1] != self.base or not np.array_equal(self.codes[: self.base], np.arange(self.base)):
            raise ValueError(f"codes: the single words' are not the vocabulary's {self.base} ids")

    def __len__(self) -> int:
        return len(self.image_ids)

    def _scratch(self) -> np.ndarray:
        """An all-zero flag per image; one per concurrent search (threads may share an index)."""
        try:
            return self._spare.get_nowait()
        except queue.Empty:
            return np.zeros(len(self), np.int8)

    @property
    def nbytes(self) -> int:
        arrays = (self.post_offsets, self.post_images, self.fwd_gids, self.meta, self.ref_lens, self.codes)
        return sum(a.nbytes for a in arrays)

    def search_many(
        self, queries: list[list[str]], k: int, params: BleuParams, threads: int | None = None
    ) -> list[list[Hit]]:
        """search() for each query, on every core: the kernel releases the GIL."""
        with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
            return list(pool.map(lambda query: self.search(query, k, params), queries))

    def scores(self, query: list[str], images: np.ndarray, params: BleuParams) -> list[float]:
        """BLEU of the query against each of these images (their numbers in this index, image_ids' order), as
        search scores them: for a few images that another query found."""
        c = len(query)
        ids = np.array([self.vocabulary.get(word, -1) for word in query], np.int64)
        gids, counts, orders = _query_grams(ids, self.codes, self.code_offsets, self.renumbered, self.base)
        if not c or not len(gids) or orders[0] != 1:
            return [0.0] * len(images)
        keep = orders <= params.max_order
        gids, counts, orders = gids[keep], counts[keep], orders[keep]
        nums = np.zeros(params.max_order, np.int64)
        out = []
        for image in np.asarray(images, np.int64).tolist():
            _matches(self.fwd_gids, self.meta[image, 0], self.meta[image + 1, 0], gids, counts, orders, nums)
            out.append(score(tuple(nums.tolist()), c, _penalised_length(self.meta, self.ref_lens, image, c), params))
        return out

    def search(self, query: list[str], k: int, params: BleuParams) -> list[Hit]:
        """The k images that score highest against the query (ties: image_id ascending); zero scores are no hits."""
        if params.max_order > self.max_order:
            raise ValueError(f"the index holds n-grams up to {self.max_order}, the weights need {params.max_order}")
        c = len(query)
        if not query or k < 1 or not len(self):
            return []
        ids = np.array([self.vocabulary.get(word, -1) for word in query], np.int64)  # -1: a word no image has
        gids, counts, orders = _query_grams(ids, self.codes, self.code_offsets, self.renumbered, self.base)
        if not len(gids) or orders[0] != 1:
            return []
        weights = np.array(_weights(params, c), np.float64)
        dens = np.array(denominators(c, params.max_order), np.int64)
        keep = orders <= params.max_order
        mark = self._scratch()
        images, nums, refs = _search(
            gids[keep],
            counts[keep],
            orders[keep],
            dens,
            weights,
            SMOOTHING_CODES[params.smoothing],
            c,
            k,
            self.post_offsets,
            self.post_images,
            self.fwd_gids,
            self.meta,
            self.ref_lens,
            mark,
        )
        self._spare.put(mark)  # all zero again (not returned when the search raised)
        exact: dict[tuple, float] = {}
        scored = []
        for image, row, ref in zip(images.tolist(), nums.tolist(), refs.tolist()):
            key = (*row, ref)
            if key not in exact:
                exact[key] = score(tuple(row), c, ref, params)
            if exact[key] > 0:
                scored.append((-exact[key], int(self.id_rank[image]), image))
        scored.sort()
        return [Hit(self.image_ids[image], -negative) for negative, _, image in scored[:k]]


def _rising(name: str, offsets: np.ndarray, strictly: bool = False) -> None:
    """ValueError unless offsets start at 0 and never fall (rise at every step, strictly)."""
    if len(offsets) and offsets[0] != 0:
        raise ValueError(f"{name} starts at {offsets[0]}, not 0")
    falls = np.less_equal if strictly else np.less
    for start in range(0, len(offsets) - 1, CHECK_CHUNK):
        chunk = offsets[start : start + CHECK_CHUNK + 1]
        if falls(chunk[1:], chunk[:-1]).any():
            at = start + int(np.argmax(falls(chunk[1:], chunk[:-1]))) + 1
            raise ValueError(f"{name} {'does not rise' if strictly else 'falls'} at {at}")


def _below(name: str, values: np.ndarray, count: int) -> None:
    """ValueError unless 0 <= every value < count."""
    for start in range(0, len(values), CHECK_CHUNK):
        chunk = values[start : start + CHECK_CHUNK]
        low, high = chunk.min(), chunk.max()
        if low < 0 or high >= count:
            raise ValueError(f"{name} holds {low if low < 0 else high}, outside 0..{count - 1}")


class _Order(NamedTuple):
    """One order's n-grams: distinct codes (sorted; gram id = position), each image's grams, postings."""

    codes: np.ndarray
    image: np.ndarray  # (image, gid, count): every image's distinct grams, grouped by image, ids ascending
    gid: np.ndarray
    count: np.ndarray
    post_offsets: np.ndarray
    post_images: np.ndarray

    @classmethod
    def build(cls, n: int, position_codes, ref_offsets, ref_image, base: int) -> _Order:
        image, code, count = _image_grams(position_codes, ref_offsets, ref_image)
        # Single words are vocabulary ids already, 0..V-1 and all used: no renumbering needed.
        codes, gid = (np.arange(base), code) if n == 1 else _dense_sorted(code)
        return cls(codes, image, gid, count, *_postings(gid, image, len(codes)))


@njit(cache=True, nogil=True)
def _dense_sorted(codes):
    """np.unique(codes, return_inverse=True) for codes >= 0, by an LSD radix sort of (code, position):
    a few linear passes instead of a comparison sort."""
    n = len(codes)
    bits = 1
    while n and codes.max() >> bits:
        bits += 1
    keys, positions = codes.copy(), np.arange(n)
    keys_out, positions_out = np.empty_like(keys), np.empty_like(positions)
    for shift in range(0, bits, RADIX_BITS):
        starts = np.zeros((1 << RADIX_BITS) + 1, np.int64)
        for i in range(n):
            starts[((keys[i] >> shift) & RADIX_MASK) + 1] += 1
        for digit in range(1 << RADIX_BITS):
            starts[digit + 1] += starts[digit]
        for i in range(n):
            digit = (keys[i] >> shift) & RADIX_MASK
            keys_out[starts[digit]], positions_out[starts[digit]] = keys[i], positions[i]
            starts[digit] += 1
        keys, keys_out = keys_out, keys
        positions, positions_out = positions_out, positions
    distinct, inverse = np.empty(n, np.int64), np.empty(n, np.int64)
    m = -1
    for i in range(n):
        if i == 0 or keys[i] != keys[i - 1]:
            m += 1
            distinct[m] = keys[i]
        inverse[positions[i]] = m
    return distinct[: m + 1], inverse


def _weights(params: BleuParams, query_length: int) -> tuple[float, ...]:
    if params.auto_reweigh and query_length < 4 and params.weights == (0.25, 0.25, 0.25, 0.25):
        return (1 / query_length,) * query_length + (0.0,) * (params.max_order - query_length)
    return params.weights


# Build kernels.
@njit(cache=True, nogil=True)
def _extend(codes, tokens, ref_offsets, n, base):
    """Order n-1 codes by position -> order n codes: code * base + the n-th word, -1 past a text's end."""
    out = np.full(len(codes), -1, np.int64)
    for r in range(len(ref_offsets) - 1):
        for i in range(ref_offsets[r], ref_offsets[r + 1] - n + 1):
            if codes[i] >= 0:
                out[i] = codes[i] * base + tokens[i + n - 1]
    return out


@njit(cache=True, nogil=True)
def _insertion_sort(values, start, end):
    for i in range(start + 1, end):
        value, j = values[i], i - 1
        while j >= start and values[j] > value:
            values[j + 1] = values[j]
            j -= 1
        values[j + 1] = value


@njit(cache=True, nogil=True)
def _image_grams(codes, ref_offsets, ref_image):
    """(image, code, count) for every distinct gram of each image: the largest count in any one of its texts."""
    images = np.empty(len(codes), np.int64)
    out_codes = np.empty(len(codes), np.int64)
    counts = np.empty(len(codes), np.int64)
    out = 0
    r = 0
    n_refs = len(ref_offsets) - 1
    while r < n_refs:
        image = ref_image[r]
        start = out
        while r < n_refs and ref_image[r] == image:  # all texts of this image
            ref_start = out
            for i in range(ref_offsets[r], ref_offsets[r + 1]):
                if codes[i] >= 0:
                    out_codes[out] = codes[i]
                    out += 1
            if out - ref_start <= 32:  # captions: short sorts, done faster in place
                _insertion_sort(out_codes, ref_start, out)
            else:
                out_codes[ref_start:out].sort()
            write = ref_start  # count within this text
            i = ref_start
            while i < out:
                j = i
                while j < out and out_codes[j] == out_codes[i]:
                    j += 1
                out_codes[write] = out_codes[i]
                counts[write] = j - i
                write += 1
                i = j
            kept = ref_start  # a code an earlier text of the image has: keep the larger count there
            for a in range(ref_start, write):
                merged = False
                for b in range(start, ref_start):
                    if out_codes[b] == out_codes[a]:
                        counts[b] = max(counts[b], counts[a])
                        merged = True
                        break
                if not merged:
                    out_codes[kept] = out_codes[a]
                    counts[kept] = counts[a]
                    kept += 1
            out = kept
            r += 1
        images[start:out] = image
    return images[:out], out_codes[:out], counts[:out]


@njit(cache=True, nogil=True)
def _group_offsets(keys, n_keys):
    """Where each key's group starts when entries are grouped by key (0..n_keys-1): a counting sort's offsets."""
    offsets = np.zeros(n_keys + 1, np.int64)
    for key in keys:
        offsets[key + 1] += 1
    for key in range(n_keys):
        offsets[key + 1] += offsets[key]
    return offsets


@njit(cache=True, nogil=True)
def _postings(gid, image, n_grams):
    """For each gram, the images that have it, in image order (entries come in image order)."""
    offsets = _group_offsets(gid, n_grams)
    fill = offsets[:-1].copy()
    out = np.empty(len(gid), np.int32)
    for e in range(len(gid)):
        out[fill[gid[e]]] = image[e]
        fill[gid[e]] += 1
    return offsets, out


@njit(cache=True, nogil=True)
def _forward(images, gids, counts, gid_offsets, n_images):
    """For each image, its gram ids ascending, each repeated as often as the image has it.

    Per order n: (image, id within the order, count) grouped by image with ids ascending (numbered
    in code order), so an image's list is already sorted unless a later text of it added grams."""
    offsets = np.zeros(n_images + 1, np.int64)
    for n in range(len(images)):
        for e in range(len(images[n])):
            offsets[images[n][e] + 1] += counts[n][e]
    for i in range(n_images):
        offsets[i + 1] += offsets[i]
    fill = offsets[:-1].copy()
    out = np.empty(offsets[-1], np.int32)
    for n in range(len(images)):
        image, gid, count = images[n], gids[n], counts[n]
        for e in range(len(image)):
            for _ in range(count[e]):
                out[fill[image[e]]] = gid[e] + gid_offsets[n]
                fill[image[e]] += 1
    for i in range(n_images):
        grams = out[offsets[i] : offsets[i + 1]]
        for j in range(1, len(grams)):
            if grams[j] < grams[j - 1]:
                grams.sort()
                break
    return out, offsets


# Query kernel.
@njit(cache=True, nogil=True)
def _log_terms(dens, weights, smoothing):
    """weights[n] * log(p_n) for each order n and match count 0..dens[n], so that scoring a candidate
    takes no logarithm. Method3's empty orders depend on how many came before: `empty[n, e]`."""
    n_orders = len(dens)
    table = np.zeros((n_orders, dens.max() + 1))
    empty = np.zeros((n_orders, n_orders + 1))
    for n in range(n_orders):
        d = dens[n]
        for m in range(d + 1):
            if smoothing == 0:
                p = m / d if m else 2.2250738585072014e-308
            elif smoothing == 1:
                p = m / d if m else 0.1 / d
            elif smoothing == 2:
                p = m / d if n == 0 else (m + 1) / (d + 1)
            else:
                p = m / d if m else 1.0
            table[n, m] = weights[n] * math.log(p) if p > 0 else 0.0  # p = 0: no unigram match, score 0
        for e in range(1, n_orders + 1):
            empty[n, e] = weights[n] * math.log(1.0 / (2.0**e * d))
    return table, empty


@njit(cache=True, nogil=True)
def _approx_score(nums, table, empty, smoothing, c, r):
    """The score in floating point (r: the penalised length, 0 for none)."""
    if nums[0] == 0:
        return 0.0
    total = 0.0
    n_empty = 1
    for n in range(len(nums)):
        if smoothing == 3 and nums[n] == 0:
            total += empty[n, n_empty]
            n_empty += 1
        else:
            total += table[n, nums[n]]
    bp = 1.0 if c > r else math.exp(1.0 - r / c)
    return bp * math.exp(total)


@njit(cache=True, nogil=True)
def _query_grams(ids, codes, code_offsets, renumbered, base):
    """The query's n-grams that the index has: gram ids ascending, their counts in the query, their orders.
    ids: the query's words as vocabulary ids (-1 for unknown); codes are built as in the index."""
    n_orders, m = len(code_offsets) - 1, len(ids)
    position = ids.copy()  # the code of the n-gram at each position, -1 when the index lacks it
    found = np.full(m, -1, np.int64)  # its gram id
    out = np.empty(m * n_orders, np.int64)
    n_out = 0
    for n in range(1, n_orders + 1):
        lo, hi = code_offsets[n - 1], code_offsets[n]
        for i in range(m - n + 1):
            if n > 1:  # an n-gram the index has starts with an (n-1)-gram it has
                if found[i] < 0 or ids[i + n - 1] < 0:
                    position[i] = -1
                else:
                    prefix = found[i] - code_offsets[n - 2] if renumbered[n - 2] else position[i]
                    position[i] = prefix * base + ids[i + n - 1]
            found[i] = -1
            if position[i] >= 0:
                at = lo + np.searchsorted(codes[lo:hi], position[i])
                if at < hi and codes[at] == position[i]:
                    found[i] = at
                    out[n_out] = at
                    n_out += 1
        found[m - n + 1 :] = -1
    grams = np.sort(out[:n_out])
    gids, counts = np.empty(n_out, np.int64), np.empty(n_out, np.int64)
    n_gids = 0
    for j in range(n_out):
        if j and grams[j] == grams[j - 1]:
            counts[n_gids - 1] += 1
        else:
            gids[n_gids], counts[n_gids] = grams[j], 1
            n_gids += 1
    orders = np.searchsorted(code_offsets, gids[:n_gids], side="right")
    return gids[:n_gids], counts[:n_gids], orders


@njit(cache=True, nogil=True)
def _search(
    gids, qcounts, orders, dens, weights, smoothing, c, k, post_offsets, post_images, fwd_gids, meta, ref_lens, seen
):
    """The candidates for the exact top k: the k best by approximate score (ties: lower id_rank)
    plus any image whose approximate score is too close to theirs to order without exact arithmetic.
    gids ascend. `seen` is scratch space of one flag per image, all 0, and left all 0."""
    n_orders, n_grams = len(dens), len(gids)
    lengths = np.empty(n_grams, np.int64)
    for i in range(n_grams):
        lengths[i] = post_offsets[gids[i] + 1] - post_offsets[gids[i]]
    table, empty = _log_terms(dens, weights, smoothing)
    read_order = _read_order(lengths, qcounts, orders, dens, table, empty, smoothing, c)
    # best[i]: the most matches per order an image can have that only lists read_order[i:] contain;
    # bounds[i]: its best score (no brevity penalty).
    best = np.zeros((n_grams + 1, n_orders), np.int64)
    bounds = np.zeros(n_grams + 1)
    remaining = np.zeros(n_orders, np.int64)
    for i in range(n_grams - 1, -1, -1):
        g = read_order[i]
        remaining[orders[g] - 1] += qcounts[g]
        best[i] = np.minimum(remaining, dens)
        bounds[i] = _approx_score(best[i], table, empty, smoothing, c, 0) * (1 + MARGIN)

    heap = _Heap(k, n_orders)
    near_images, near_scores = [np.int64(0) for _ in range(0)], [0.0 for _ in range(0)]
    touched = [np.int64(0) for _ in range(0)]
    nums = np.zeros(n_orders, np.int64)
    worst = 0.0  # the k-th best score once the heap is full; kept here, the loop reads it for every posting
    for i in range(n_grams):
        if worst > bounds[i]:
            break
        g = read_order[i]
        last_len, bp_bound, can_tie = -1, 1.0, False
        end = post_offsets[gids[g] + 1]
        for p in range(post_offsets[gids[g]], end):
            # Candidates wait on memory: ask for the rows of the next ones early (AHEAD, then half that).
            if p + AHEAD < end:  # its row and the next (where its ranges end)
                _prefetch(meta, 4 * post_images[p + AHEAD])
                _prefetch(meta, 4 * post_images[p + AHEAD] + 7)
            if p + AHEAD // 2 < end:
                at = meta[post_images[p + AHEAD // 2], 0]
                _prefetch(fwd_gids, at)
                _prefetch(fwd_gids, at + 16)
            image = post_images[p]
            if meta[image, 2] != last_len:  # the list runs from short texts to long
                last_len = meta[image, 2]
                bp_bound = 1.0 if c > last_len else math.exp(1.0 - last_len / c)
                if worst > bounds[i] * bp_bound:
                    break
                can_tie = _can_tie(heap, best[i], last_len, c)
            # The rest of this list can at best tie the worst kept image: the same counts, and a text
            # as long (longer ones score lower once the brevity penalty applies, text >= query);
            # ties go to the lower image_id, and ids only grow among texts of one length.
            if can_tie and meta[image, 1] > heap.worst_rank():
                break
            if seen[image]:
                continue
            seen[image] = 1
            touched.append(image)
            _matches(fwd_gids, meta[image, 0], meta[image + 1, 0], gids, qcounts, orders, nums)
            r = _penalised_length(meta, ref_lens, image, c)
            s = _approx_score(nums, table, empty, smoothing, c, r)
            if s <= 0 or s < worst * (1 - MARGIN):  # most candidates: out without touching the heap
                continue
            evicted, evicted_score, ambiguous = heap.offer(s, meta[image, 1], image, nums, r)
            if ambiguous and evicted_score >= heap.worst_score() * (1 - MARGIN):
                near_images.append(evicted)  # too close to the k-th to drop on an approximate score
                near_scores.append(evicted_score)
            if heap.full():
                worst = heap.worst_score()
                can_tie = _can_tie(heap, best[i], last_len, c)
    for image in touched:
        seen[image] = 0

    threshold = heap.worst_score() * (1 - MARGIN) if heap.full() else 0.0
    chosen = [heap.images[j] for j in range(heap.size)]
    for j in range(len(near_images)):
        if near_scores[j] >= threshold:
            chosen.append(near_images[j])
    out_images = np.empty(len(chosen), np.int64)
    out_nums = np.zeros((len(chosen), n_orders), np.int64)
    out_refs = np.empty(len(chosen), np.int64)
    for j in range(len(chosen)):
        image = chosen[j]
        out_images[j] = image
        _matches(fwd_gids, meta[image, 0], meta[image + 1, 0], gids, qcounts, orders, nums)
        out_nums[j] = nums
        out_refs[j] = _penalised_length(meta, ref_lens, image, c)
    return out_images, out_nums, out_refs


@njit(cache=True, nogil=True)
def _read_order(lengths, qcounts, orders, dens, table, empty, smoothing, c):
    """The order to read the postings lists in: any order is exact, the bound only has to cover the
    unread lists. Greedy: next, the list that lowers the bound the most per posting, so that the
    bound falls below the k-th best score after as few postings as possible. Within one order the
    shortest list goes first; the last list with single words (the bound falls to 0) goes last."""
    n_orders, n_grams = len(dens), len(lengths)
    by_length = np.argsort(lengths, kind="mergesort")
    remaining = np.zeros(n_orders, np.int64)
    for g in range(n_grams):
        remaining[orders[g] - 1] += qcounts[g]
    taken = np.zeros(n_grams, np.bool_)
    out = np.empty(n_grams, np.int64)
    for i in range(n_grams):
        now = _approx_score(np.minimum(remaining, dens), table, empty, smoothing, c, 0)
        choice, best_gain = -1, -1.0
        for n in range(n_orders):  # the shortest unread list of each order competes
            for j in range(n_grams):
                g = by_length[j]
                if taken[g] or orders[g] != n + 1:
                    continue
                remaining[n] -= qcounts[g]
                after = _approx_score(np.minimum(remaining, dens), table, empty, smoothing, c, 0)
                remaining[n] += qcounts[g]
                gain = (math.log(now) - math.log(after)) / lengths[g] if after > 0 else -0.5
                if gain > best_gain:
                    choice, best_gain = g, gain
                break
        out[i] = choice
        taken[choice] = True
        remaining[orders[choice] - 1] -= qcounts[choice]
    return out


@njit(cache=True, nogil=True)
def _can_tie(heap, best, length, c):
    """Whether an image with the best counts left and a text this long would tie the worst kept one."""
    return c <= length and heap.full() and heap.worst_is(best, length if length > c else 0)


@njit(cache=True, nogil=True)
def _matches(fwd_gids, start, end, gids, qcounts, orders, nums):
    """An image's clipped matches per order into nums: its sorted gram ids merged with the query's."""
    nums[:] = 0
    a, b = start, 0
    while a < end and b < len(gids):
        if fwd_gids[a] < gids[b]:
            a += 1
        elif fwd_gids[a] > gids[b]:
            b += 1
        else:
            run = 0
            while a < end and fwd_gids[a] == gids[b]:
                run += 1
                a += 1
            nums[orders[b] - 1] += min(run, qcounts[b])
            b += 1


@njit(cache=True, nogil=True)
def _penalised_length(meta, ref_lens, image, c):
    """The closest text length where it brings a brevity penalty (> c), else 0: images with the
    same matches and the same value score the same."""
    best = meta[image, 2]  # the shortest, and the only one when there is one text
    if meta[image + 1, 3] - meta[image, 3] > 1:
        for i in range(meta[image, 3], meta[image + 1, 3]):
            length = ref_lens[i]
            if abs(length - c) < abs(best - c) or (abs(length - c) == abs(best - c) and length < best):
                best = length
    return best if best > c else 0


@intrinsic
def _prefetch(typingctx, array, index):
    """Start loading array.flat[index] into the caches; no effect on results."""

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        array = context.make_array(array_type)(context, builder, args[0])
        address = builder.gep(array.data, [args[1]])
        bytes_pointer, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [bytes_pointer, i32, i32, i32]), "llvm.prefetch.p0i8"
        )
        builder.call(prefetch, [builder.bitcast(address, bytes_pointer), i32(0), i32(3), i32(1)])  # read, keep, data
        return context.get_dummy_value()

    return types.void(array, index), codegen


@jitclass(
    [
        ("scores", float64[:]),
        ("ranks", int64[:]),
        ("images", int64[:]),
        ("nums", int64[:, :]),
        ("refs", int64[:]),
        ("size", int64),
    ]
)
class _Heap:
    """The k best (score, id_rank) so far; the root is the worst: lowest score, then highest id_rank.

    A newcomer that ties the worst on score replaces it only if it has the same counts (so the
    same exact score) and a lower id_rank; a tie between different counts goes to `near`."""

    def __init__(self, k, n_orders):
        self.scores = np.zeros(k)
        self.ranks = np.zeros(k, np.int64)
        self.images = np.zeros(k, np.int64)
        self.nums = np.zeros((k, n_orders), np.int64)
        self.refs = np.zeros(k, np.int64)
        self.size = 0

    def full(self):
        return self.size == len(self.scores)

    def worst_score(self):
        return self.scores[0]

    def worst_rank(self):
        return self.ranks[0]

    def worst_is(self, nums, ref):
        """Whether the worst kept image has these counts and penalised length (so this exact score)."""
        if self.refs[0] != ref:
            return False
        for n in range(len(nums)):
            if self.nums[0, n] != nums[n]:
                return False
        return True

    def offer(self, score, rank, image, nums, ref):
        """Add (score, rank). Returns the image left out (-1 if none), its score, and whether it
        may still belong in the top k once scores are exact (it lost on approximate scores only)."""
        if not self.full():
            self._put(self.size, score, rank, image, nums, ref)
            self.size += 1
            self._up(self.size - 1)
            return -1, 0.0, False
        worst = self.scores[0]
        if score < worst:
            return image, score, True
        if score == worst:
            same = self.refs[0] == ref
            for n in range(len(nums)):
                same = same and self.nums[0, n] == nums[n]
            if not same:
                return image, score, True
            if rank > self.ranks[0]:  # the same counts score the same exactly: the higher id loses
                return image, score, False
        evicted, evicted_score, exact_loser = self.images[0], worst, score == worst
        self._put(0, score, rank, image, nums, ref)
        self._down(0)
        return evicted, evicted_score, not exact_loser

    def _put(self, at, score, rank, image, nums, ref):
        self.scores[at], self.ranks[at], self.images[at], self.refs[at] = score, rank, image, ref
        self.nums[at, :] = nums

    def _worse(self, a, b):
        return self.scores[a] < self.scores[b] or (self.scores[a] == self.scores[b] and self.ranks[a] > self.ranks[b])

    def _swap(self, a, b):
        self.scores[a], self.scores[b] = self.scores[b], self.scores[a]
        self.ranks[a], self.ranks[b] = self.ranks[b], self.ranks[a]
        self.images[a], self.images[b] = self.images[b], self.images[a]
        self.refs[a], self.refs[b] = self.refs[b], self.refs[a]
        for n in range(self.nums.shape[1]):
            self.nums[a, n], self.nums[b, n] = self.nums[b, n], self.nums[a, n]

    def _up(self, i):
        while i > 0 and self._worse(i, (i - 1) // 2):
            self._swap(i, (i - 1) // 2)
            i = (i - 1) // 2

    def _down(self, i):
        while True:
            left, right, worst = 2 * i + 1, 2 * i + 2, i
            if left < self.size and self._worse(left, worst):
                worst = left
            if right < self.size and self._worse(right, worst):
                worst = right
            if worst == i:
                return
            self._swap(i, worst)
            i = worst


def compile_kernels() -> None:
    """Compile the kernels once and cache them on disk (numba, next to this file): without this the
    first search of every process, Spark workers included, spends about 20 s compiling."""
    index = BleuIndex.from_captions(["a", "b"], pa.array(["a red ball on the grass", "two dogs in the water"]), 4)
    for smoothing in SMOOTHINGS:
        index.search(["a", "red", "ball", "on", "the"], 1, BleuParams(smoothing=smoothing))
    index.search_many([["dogs"], ["zebra"]], 2, BleuParams(auto_reweigh=False))
    BleuIndex.from_texts(["a"], [[["a", "red", "ball"], ["red", "ball"]]], 4).search(["red"], 1, BleuParams())
    from cbir.references import References  # it imports this module: the matched text's kernel, compiled too

    tied = pa.array([["a red ball", "red ball"]], pa.list_(pa.string()))
    References.from_lists(tied, pa.array([["caption", "label"]], pa.list_(pa.string()))).matched(
        [["red"]], BleuParams()
    )


if __name__ == "__main__":
    compile_kernels()
