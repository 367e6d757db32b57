"""Exact BLEU top-k over many captions without a per-pair loop.

Build: every image's texts become integer n-gram codes (1..max_order); for each n-gram the
postings list of images that contain it, and for each image its n-grams with their counts
(the most any one of its texts has: BLEU clips against the best reference).

Query (MaxScore pruning): the query's n-grams are taken from the rarest to the most common.
An image is scored in full the first time one of its n-grams' postings is read. Before each
list, a bound is computed on the score of any image that only the remaining (more common)
lists could still bring, taking every remaining match as granted and no brevity penalty; once
the k-th best score beats that bound, no unread image can enter the top k, so the long
postings of words like "a" and "the" are seldom read at all.

The loop computes scores in floating point with a small margin; the final top k, ties by
image_id ascending, are then scored with cbir.bleu.score, which is nltk's arithmetic exactly.
"""

from __future__ import annotations

import math
import os
import queue
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numba import float64, int64, njit
from numba.experimental import jitclass

from cbir.bleu import BleuParams, denominators, score
from cbir.text import words_array

MARGIN = 1e-9  # relative: far above float rounding, far below any real difference between scores
SMOOTHING_CODES = {"method0": 0, "method1": 1, "method2": 2, "method3": 3}


@dataclass
class Hit:
    image_id: str
    score: float


class BleuIndex:
    """An immutable index over images' texts: each image has one or more texts, each a list of words."""

    @classmethod
    def from_captions(cls, image_ids: list[str], captions, max_order: int = 4) -> "BleuIndex":
        """One caption string per image, split into words as the captioner's tokenizer does."""
        return cls(image_ids, words_array(captions), None, max_order)

    @classmethod
    def from_texts(cls, image_ids: list[str], texts: list[list[list[str]]], max_order: int = 4) -> "BleuIndex":
        """Word lists: texts[i] are image i's texts (none counts as one empty text)."""
        if len(image_ids) != len(texts):
            raise ValueError("one list of texts per image")
        refs = pa.array([ref for image_refs in texts for ref in (image_refs or [[]])], pa.list_(pa.string()))
        return cls(image_ids, refs, np.array([max(len(image_refs), 1) for image_refs in texts], np.int64), max_order)

    def __init__(self, image_ids: list[str], refs: pa.ListArray, refs_per_image: np.ndarray | None = None,
                 max_order: int = 4):
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
        self.id_rank, self.min_lens = id_rank[order], shortest[order]
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
        self.ref_len_offsets = np.concatenate([[0], np.cumsum(refs_per_image[order])])
        self.ref_lens = np.diff(ref_offsets)  # refs are grouped by image, in image order

        # The code of the n-gram starting at each position (-1 where it runs past its text):
        # the (n-1)-gram's code times the vocabulary size plus the next word. When that would
        # overflow, the (n-1)-gram codes are renumbered densely first (kept, for queries).
        self.renumbered, by_order = [], [tokens.copy()]
        for n in range(2, max_order + 1):
            position_codes = by_order[-1]
            renumber = None
            if position_codes.max(initial=0) >= 2**62 // self.base:
                valid = position_codes >= 0
                renumber, dense = np.unique(position_codes[valid], return_inverse=True)
                position_codes = position_codes.copy()
                position_codes[valid] = dense
            self.renumbered.append(renumber)
            by_order.append(_extend(position_codes, tokens, ref_offsets, n, self.base))

        def grams(n: int):
            """(image, gram id within order n, count) of every image's distinct n-grams, and the codes."""
            image, code, count = _image_grams(by_order[n - 1], ref_offsets, ref_image)
            # Single words are vocabulary ids already, 0..V-1 and all used: no renumbering needed.
            unique, gid = (np.arange(self.base), code) if n == 1 else _dense_sorted(code)
            return image, gid, count, unique

        # The orders are independent from here: their kernels release the GIL and run side by side.
        with ThreadPoolExecutor(min(max_order, os.cpu_count() or 1)) as pool:
            results = list(pool.map(grams, range(1, max_order + 1)))
        self.codes = [unique for *_, unique in results]
        offsets = np.cumsum([0] + [len(c) for c in self.codes])
        entries = [(image, gid + offsets[n], count) for n, (image, gid, count, _) in enumerate(results)]
        image = np.concatenate([e[0] for e in entries])
        gid = np.concatenate([e[1] for e in entries])
        count = np.concatenate([e[2] for e in entries])
        n_grams = sum(len(c) for c in self.codes)
        self.post_offsets, self.post_images = _postings(gid, image, n_grams)
        self.fwd_offsets, self.fwd_gids, self.fwd_counts = _forward(image, gid, count, n_images)

    def __len__(self) -> int:
        return len(self.image_ids)

    def _scratch(self) -> np.ndarray:
        """An all-zero int per image; one per concurrent search (threads may share an index)."""
        try:
            return self._spare.get_nowait()
        except queue.Empty:
            return np.zeros(len(self), np.int32)

    @property
    def nbytes(self) -> int:
        arrays = (self.post_offsets, self.post_images, self.fwd_offsets, self.fwd_gids, self.fwd_counts,
                  self.ref_len_offsets, self.ref_lens, *self.codes)
        return sum(a.nbytes for a in arrays)

    def _query_grams(self, query: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The query's n-grams present in the index: global gram ids (sorted), counts, orders."""
        ids = [self.vocabulary.get(word, -1) for word in query]  # -1: a word no image has
        gids, counts, orders = [], [], []
        offset = 0
        position_codes = list(ids)
        for n in range(1, self.max_order + 1):
            if n > 1:  # the same codes as the build: previous code (renumbered if it was), times base, plus word
                renumber = self.renumbered[n - 2]
                if renumber is not None:
                    position_codes = [_rank(renumber, code) for code in position_codes]
                position_codes = [code * self.base + ids[i + n - 1] if code >= 0 and ids[i + n - 1] >= 0 else -1
                                  for i, code in enumerate(position_codes[:len(ids) - n + 1])]
            unique, count = np.unique(np.array([c for c in position_codes if c >= 0], np.int64), return_counts=True)
            codes = self.codes[n - 1]
            at = np.searchsorted(codes, unique).clip(max=max(len(codes) - 1, 0))
            found = codes[at] == unique if len(codes) else np.zeros(len(unique), bool)
            gids.append(at[found] + offset)
            counts.append(count[found])
            orders.append(np.full(found.sum(), n))
            offset += len(codes)
        return np.concatenate(gids), np.concatenate(counts), np.concatenate(orders)

    def search(self, query: list[str], k: int, params: BleuParams) -> list[Hit]:
        """The k images that score highest against the query (ties: image_id ascending); zero scores are no hits."""
        if params.max_order > self.max_order:
            raise ValueError(f"the index holds n-grams up to {self.max_order}, the weights need {params.max_order}")
        c = len(query)
        if not query or k < 1 or not len(self):
            return []
        gids, counts, orders = self._query_grams(query)
        if not len(gids) or not (orders == 1).any():
            return []
        weights = np.array(_weights(params, c), np.float64)
        dens = np.array(denominators(c, params.max_order), np.int64)
        keep = orders <= params.max_order
        mark = self._scratch()
        images, nums, refs = _search(gids[keep], counts[keep], orders[keep], dens, weights,
                                     SMOOTHING_CODES[params.smoothing], c, k, self.post_offsets, self.post_images,
                                     self.fwd_offsets, self.fwd_gids, self.fwd_counts, self.ref_len_offsets,
                                     self.ref_lens, self.min_lens, self.id_rank, mark)
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


def _dense_sorted(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(codes, return_inverse=True), hashing first so only the distinct codes are sorted."""
    first_seen, distinct = _densify(codes)
    order = np.argsort(distinct)
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return distinct[order], rank[first_seen]


def _rank(sorted_codes: np.ndarray, code: int) -> int:
    """The dense number of a code, or -1 when no image has it."""
    if code < 0:
        return -1
    at = int(np.searchsorted(sorted_codes, code))
    return at if at < len(sorted_codes) and sorted_codes[at] == code else -1


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
def _densify(codes):
    """Number the distinct codes in order of first appearance (open addressing, Fibonacci hashing)."""
    size, shift = 1, 64
    while size < 1.5 * len(codes) + 1:
        size *= 2
        shift -= 1
    keys = np.full(size, -1, np.int64)
    ids = np.empty(size, np.int64)
    out = np.empty(len(codes), np.int64)
    distinct = np.empty(len(codes), np.int64)
    n = 0
    for i in range(len(codes)):
        code = codes[i]
        slot = (np.uint64(code) * np.uint64(11400714819323198485)) >> np.uint64(shift)
        while keys[slot] != -1 and keys[slot] != code:
            slot = (slot + np.uint64(1)) & np.uint64(size - 1)
        if keys[slot] == -1:
            keys[slot] = code
            ids[slot] = n
            distinct[n] = code
            n += 1
        out[i] = ids[slot]
    return out, distinct[:n]


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
def _forward(image, gid, count, n_images):
    """For each image, its grams sorted by id, with counts."""
    offsets = _group_offsets(image, n_images)
    fill = offsets[:-1].copy()
    gids = np.empty(len(gid), np.int32)
    counts = np.empty(len(gid), np.int16)
    for e in range(len(gid)):
        at = fill[image[e]]
        gids[at] = gid[e]
        counts[at] = min(count[e], 32767)
        fill[image[e]] += 1
    for i in range(n_images):
        order = np.argsort(gids[offsets[i]:offsets[i + 1]])
        gids[offsets[i]:offsets[i + 1]] = gids[offsets[i]:offsets[i + 1]][order]
        counts[offsets[i]:offsets[i + 1]] = counts[offsets[i]:offsets[i + 1]][order]
    return offsets, gids, counts


# Query kernel.
@njit(cache=True, nogil=True)
def _approx_score(nums, dens, weights, smoothing, c, r):
    if nums[0] == 0:
        return 0.0
    total = 0.0
    empty = 1
    for n in range(len(dens)):
        m, d = nums[n], dens[n]
        if smoothing == 0:
            p = m / d if m else 2.2250738585072014e-308
        elif smoothing == 1:
            p = m / d if m else 0.1 / d
        elif smoothing == 2:
            p = m / d if n == 0 else (m + 1) / (d + 1)
        else:
            if m:
                p = m / d
            else:
                p = 1.0 / (2.0 ** empty * d)
                empty += 1
        total += weights[n] * math.log(p)
    bp = 1.0 if c > r else math.exp(1.0 - r / c)
    return bp * math.exp(total)


@njit(cache=True, nogil=True)
def _search(gids, qcounts, orders, dens, weights, smoothing, c, k, post_offsets, post_images,
            fwd_offsets, fwd_gids, fwd_counts, ref_len_offsets, ref_lens, min_lens, id_rank, seen):
    """The candidates for the exact top k: the k best by approximate score (ties: lower id_rank)
    plus any image whose approximate score is too close to theirs to order without exact arithmetic.
    `seen` is scratch space of one int per image, all 0, and left all 0."""
    n_orders, n_grams = len(dens), len(gids)
    lengths = np.empty(n_grams, np.int64)
    for i in range(n_grams):
        lengths[i] = post_offsets[gids[i] + 1] - post_offsets[gids[i]]
    by_length = np.argsort(lengths, kind="mergesort")
    # bounds[i]: the best score of an image that only lists by_length[i:] contain (no brevity penalty).
    bounds = np.zeros(n_grams + 1)
    remaining = np.zeros(n_orders, np.int64)
    for i in range(n_grams - 1, -1, -1):
        g = by_length[i]
        remaining[orders[g] - 1] += qcounts[g]
        bounds[i] = _approx_score(np.minimum(remaining, dens), dens, weights, smoothing, c, 0) * (1 + MARGIN)

    heap = _Heap(k, n_orders)
    near_images, near_scores = [np.int64(0) for _ in range(0)], [0.0 for _ in range(0)]
    touched = [np.int64(0) for _ in range(0)]
    nums = np.zeros(n_orders, np.int64)
    for i in range(n_grams):
        if heap.full() and heap.worst_score() > bounds[i]:
            break
        g = by_length[i]
        best = np.minimum(remaining_from(i, by_length, orders, qcounts, n_orders), dens)
        last_len, bp_bound = -1, 1.0
        for p in range(post_offsets[gids[g]], post_offsets[gids[g] + 1]):
            image = post_images[p]
            if min_lens[image] != last_len:  # the list runs from short texts to long
                last_len = min_lens[image]
                bp_bound = 1.0 if c > last_len else math.exp(1.0 - last_len / c)
                if heap.full() and heap.worst_score() > bounds[i] * bp_bound:
                    break
            # The rest of this list can at best tie the worst kept image: the same counts, and a text
            # as long (longer ones score lower once the brevity penalty applies, text >= query);
            # ties go to the lower image_id, and ids only grow among texts of one length.
            if (c <= last_len and heap.full() and heap.worst_is(best, last_len)
                    and id_rank[image] > heap.worst_rank()):
                break
            if seen[image]:
                continue
            seen[image] = True
            touched.append(image)
            # Counts for the grams of this and the longer lists: the shorter ones did not have this image.
            nums[:] = 0
            for j in range(i, n_grams):
                q = by_length[j]
                count = _count_of(fwd_gids, fwd_counts, fwd_offsets[image], fwd_offsets[image + 1], gids[q])
                nums[orders[q] - 1] += min(count, qcounts[q])
            r = _closest(ref_lens, ref_len_offsets[image], ref_len_offsets[image + 1], c)
            s = _approx_score(nums, dens, weights, smoothing, c, r)
            if s <= 0:
                continue
            evicted, evicted_score, ambiguous = heap.offer(s, id_rank[image], image, nums, r)
            if ambiguous and evicted_score >= heap.worst_score() * (1 - MARGIN):
                near_images.append(evicted)  # too close to the k-th to drop on an approximate score
                near_scores.append(evicted_score)
    for image in touched:
        seen[image] = False

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
        for q in range(n_grams):
            count = _count_of(fwd_gids, fwd_counts, fwd_offsets[image], fwd_offsets[image + 1], gids[q])
            out_nums[j, orders[q] - 1] += min(count, qcounts[q])
        out_refs[j] = _closest(ref_lens, ref_len_offsets[image], ref_len_offsets[image + 1], c)
    return out_images, out_nums, out_refs


@njit(cache=True, nogil=True)
def remaining_from(i, by_length, orders, qcounts, n_orders):
    """The query's gram counts per order over the lists by_length[i:]."""
    out = np.zeros(n_orders, np.int64)
    for j in range(i, len(by_length)):
        out[orders[by_length[j]] - 1] += qcounts[by_length[j]]
    return out


@njit(cache=True, nogil=True)
def _count_of(fwd_gids, fwd_counts, start, end, gid):
    """An image's count of one gram: binary search in its sorted gram ids."""
    lo, hi = start, end
    while lo < hi:
        mid = (lo + hi) // 2
        if fwd_gids[mid] < gid:
            lo = mid + 1
        else:
            hi = mid
    return fwd_counts[lo] if lo < end and fwd_gids[lo] == gid else 0


@njit(cache=True, nogil=True)
def _closest(ref_lens, start, end, c):
    best = ref_lens[start]
    for i in range(start + 1, end):
        length = ref_lens[i]
        if abs(length - c) < abs(best - c) or (abs(length - c) == abs(best - c) and length < best):
            best = length
    return best


@jitclass([("scores", float64[:]), ("ranks", int64[:]), ("images", int64[:]), ("nums", int64[:, :]),
           ("refs", int64[:]), ("size", int64)])
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
        """Whether the worst kept image has these counts and closest text length (so this exact score)."""
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
