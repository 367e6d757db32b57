"""An image's references: every text of it that BLEU ranks it by, each with its kind.

Generated at index time and stored in the captions table's `references` column:
  caption      the captioner's n best distinct captions (captioner.captions_per_image)
  label        the encoder's ImageNet labels above captioner.label_threshold
  neighbour    the human texts of the captioner's training images nearest to it (models/neighbours.py)
From the image's source, in the manifest:
  title, description, tags, given (a caption that came with the image, e.g. a manifest's `caption`)

BLEU takes many references per hypothesis, so an image is found by whichever of its texts shares
the query's words; `bleu.references` chooses the kinds that count. `References.matched` says which
one text matched a query best, for people reading the results.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numba import njit

from cbir.bleu import BleuParams, score
from cbir.engine import BleuIndex
from cbir.text import words_array

GENERATED = ("caption", "label", "neighbour")
SOURCE = ("title", "description", "tags", "given")
KINDS = GENERATED + SOURCE
SOURCE_COLUMNS = {"title": "title", "description": "description", "tags": "tags", "given": "caption"}  # manifest's


@dataclass(frozen=True)
class References:
    """Texts grouped by image (in the table's row order): image i's are texts[start[i]:start[i] + counts[i]]."""

    texts: pa.StringArray
    kinds: pa.StringArray
    counts: np.ndarray

    @cached_property
    def starts(self) -> np.ndarray:
        return np.cumsum(self.counts) - self.counts

    def of(self, row: int) -> list[tuple[str, str]]:
        """(kind, text) of one image's references, in order."""
        at, n = int(self.starts[row]), int(self.counts[row])
        return list(zip(self.kinds[at : at + n].to_pylist(), self.texts[at : at + n].to_pylist()))

    def take(self, rows) -> References:
        """These images' references (rows of this one, in this order; a row may come twice)."""
        rows = np.asarray(rows, np.int64)
        counts = self.counts[rows]
        at = (
            np.arange(counts.sum())
            - np.repeat(np.cumsum(counts) - counts, counts)
            + np.repeat(self.starts[rows], counts)
        )
        at = pa.array(at, pa.int64())
        return References(self.texts.take(at), self.kinds.take(at), counts)

    def lists(self) -> tuple[pa.ListArray, pa.ListArray]:
        """(texts, kinds) as one list per image: how they travel in a column."""
        offsets = pa.array(np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int32))
        return pa.ListArray.from_arrays(offsets, self.texts), pa.ListArray.from_arrays(offsets, self.kinds)

    @classmethod
    def from_lists(cls, texts: pa.ListArray, kinds: pa.ListArray) -> References:
        counts = pc.list_value_length(texts).to_numpy(zero_copy_only=False).astype(np.int64)
        return cls(texts.flatten().cast(pa.string()), kinds.flatten().cast(pa.string()), counts)

    def matched(self, queries: list[list[str]], params: BleuParams) -> list[tuple[str, str] | None]:
        """Why image i matched queries[i]: its (kind, text) that shares the most distinct words with the query,
        among equals the one that alone scores best by BLEU, then the first; None when none shares a word.
        The words shared are counted in Arrow and numpy for every image at once (the query job shows a hundred
        thousand hits a run); only the ties are scored (their matches counted by a kernel)."""
        texts = len(self.texts)
        if not texts:
            return [None] * len(queries)
        split = words_array(self.texts)  # one Arrow call, not a regex per text
        asked = [list(dict.fromkeys(query)) for query in queries]
        asked_words = pa.array([w for words in asked for w in words], pa.string())
        vocabulary = pc.unique(asked_words)
        size = max(len(vocabulary), 1)
        # (image, word) keys of each query's words, and of each text's words that some query has
        owner = np.repeat(np.arange(len(queries), dtype=np.int64), [len(words) for words in asked])
        wanted = owner * size + pc.index_in(asked_words, vocabulary).to_numpy(zero_copy_only=False)
        code = pc.index_in(split.flatten(), vocabulary)
        text_of_word = pc.list_parent_indices(split).filter(code.is_valid()).to_numpy()
        code = code.drop_null().to_numpy().astype(np.int64)
        image_of_text = np.repeat(np.arange(len(self.counts), dtype=np.int64), self.counts)
        hits = np.isin(image_of_text[text_of_word] * size + code, wanted)
        shared_words = np.unique(text_of_word[hits] * size + code[hits])  # each word once per text
        shared = np.bincount(shared_words // size, minlength=texts)
        starts, counts = self.starts, self.counts
        most = np.zeros(len(counts), np.int64)  # per image: the most words one of its texts shares
        some = counts > 0
        most[some] = np.maximum.reduceat(shared, starts[some])
        tied = (shared == np.repeat(most, counts)) & (shared > 0)
        first = np.flatnonzero(tied)
        best = np.full(len(counts), -1, np.int64)
        best[most > 0] = first[np.searchsorted(first, starts[most > 0])]  # each image's first text of the most
        contested = np.flatnonzero(tied & (np.repeat(np.add.reduceat(tied, starts[some]), counts[some]) > 1))
        if len(contested):  # few per query: BLEU decides between the texts that share as many words
            asked_of = [queries[i] for i in image_of_text[contested]]
            at = _bleu_of_texts(split.take(pa.array(contested)), asked_of, vocabulary, params)
            for image, group in _grouped(np.arange(len(contested)), image_of_text[contested]):
                best[image] = contested[group[int(np.argmax(at[group]))]]  # the first of equal scores
        found = best >= 0
        at = pa.array(best[found])
        why = iter(zip(self.kinds.take(at).to_pylist(), self.texts.take(at).to_pylist()))
        return [next(why) if ok else None for ok in found.tolist()]


def _grouped(values: np.ndarray, keys: np.ndarray) -> list[tuple[int, list[int]]]:
    """(key, its values) for sorted keys, in order."""
    bounds = np.flatnonzero(np.diff(keys)) + 1
    return [(int(ks[0]), group.tolist()) for group, ks in zip(np.split(values, bounds), np.split(keys, bounds))]


def _bleu_of_texts(
    texts: pa.ListArray, queries: list[list[str]], vocabulary: pa.Array, params: BleuParams
) -> np.ndarray:
    """BLEU of each text (its words) alone against its query (every query's words are in `vocabulary`): the
    clipped matches counted by a kernel, the score by cbir.bleu.score (few distinct match counts: cached)."""
    distinct = {id(query): query for query in queries}
    number = {key: n for n, key in enumerate(distinct)}
    asked = list(distinct.values())
    query_codes = pc.index_in(pa.array([w for query in asked for w in query], pa.string()), vocabulary)
    text_codes = pc.fill_null(pc.index_in(texts.flatten(), vocabulary), -1)  # -1: a word no query has
    query_lengths = np.array([len(query) for query in asked], np.int64)
    text_lengths = pc.list_value_length(texts).to_numpy(zero_copy_only=False).astype(np.int64)
    found = _clipped_matches(
        query_codes.to_numpy(zero_copy_only=False).astype(np.int64),
        np.concatenate([[0], np.cumsum(query_lengths)]),
        text_codes.to_numpy(zero_copy_only=False).astype(np.int64),
        np.concatenate([[0], np.cumsum(text_lengths)]),
        np.array([number[id(query)] for query in queries], np.int64),
        params.max_order,
    )
    return np.array(
        [
            score(tuple(m), len(query), length, params)
            for m, query, length in zip(found.tolist(), queries, text_lengths.tolist())
        ]
    )


@njit(cache=True, nogil=True)
def _clipped_matches(query_codes, query_offsets, text_codes, text_offsets, query_of_text, max_order):
    """cbir.bleu.matches of each text against its query (word codes; -1 in a text: no query has the word)."""
    out = np.zeros((len(query_of_text), max_order), np.int64)
    for t in range(len(query_of_text)):
        q = query_of_text[t]
        qs, qe, ts, te = query_offsets[q], query_offsets[q + 1], text_offsets[t], text_offsets[t + 1]
        for n in range(1, max_order + 1):
            total = 0
            for i in range(ts, te - n + 1):  # each distinct n-gram of the text, at its first place
                if _count(text_codes, ts, i, text_codes, i, n) > 0:
                    continue
                in_query = _count(query_codes, qs, qe - n + 1, text_codes, i, n)
                if in_query:
                    total += min(in_query, _count(text_codes, i, te - n + 1, text_codes, i, n))
            out[t, n - 1] = total
            if total == 0:  # no longer n-gram can match
                break
    return out


@njit(cache=True, nogil=True)
def _count(codes, start, end, gram_codes, at, n):
    """How many times the n-gram at gram_codes[at:at + n] starts in codes[start:end]."""
    found = 0
    for i in range(start, end):
        same = True
        for j in range(n):
            if codes[i + j] != gram_codes[at + j]:
                same = False
                break
        found += same
    return found


def reference_texts(table: pa.Table, kinds: tuple[str, ...] | list[str] = KINDS) -> References:
    """The references of each row of `table`, keeping the chosen kinds.

    `table` has `caption` and may have `references` (the captions table's list of kind, rank, text),
    `title`, `description`, `tags` (a list) and `given`. A row without `references` (a table written
    before they existed, or any captions table) has its caption as its one generated reference.
    Every image keeps at least one text (an empty one when it has none), as the engine needs."""
    n = table.num_rows
    pieces: list[tuple[np.ndarray, pa.Array, pa.Array]] = []  # (row, kind, text), in the order they count

    stored = table.column("references").combine_chunks() if "references" in table.column_names else None
    missing = np.ones(n, bool) if stored is None else ~stored.is_valid().to_numpy(zero_copy_only=False)
    if stored is not None and stored.null_count < n:
        flat = stored.flatten()
        rows = pc.list_parent_indices(stored).to_numpy()
        pieces.append((rows, flat.field("kind"), flat.field("text")))
    if "caption" in kinds and missing.any():
        rows = np.flatnonzero(missing)
        pieces.append(
            (
                rows,
                pa.array(["caption"] * len(rows), pa.string()),
                table.column("caption").combine_chunks().take(pa.array(rows)),
            )
        )
    for kind in SOURCE:
        if kind in kinds and kind in table.column_names:
            column = table.column(kind).combine_chunks()
            if pa.types.is_list(column.type):
                column = pc.binary_join(column.cast(pa.list_(pa.string())), " ")
            pieces.append((np.arange(n), pa.array([kind] * n, pa.string()), column.cast(pa.string())))

    if pieces:
        rows = np.concatenate([p[0] for p in pieces])
        kind = pa.concat_arrays([p[1].cast(pa.string()) for p in pieces])
        text = pa.concat_arrays([p[2].cast(pa.string()) for p in pieces])
        keep = pc.and_(
            pc.is_in(kind, value_set=pa.array(list(kinds), pa.string())),
            pc.greater(pc.utf8_length(pc.fill_null(text, "")), 0),
        ).to_numpy(zero_copy_only=False)
        rows, kind, text = rows[keep], kind.filter(pa.array(keep)), text.filter(pa.array(keep))
    else:
        rows, kind, text = np.zeros(0, np.int64), pa.array([], pa.string()), pa.array([], pa.string())
    # An image without texts gets one empty text; then all in row order, each image's in their order.
    bare = np.flatnonzero(np.bincount(rows, minlength=n) == 0)
    rows = np.concatenate([rows, bare])
    kind = pa.concat_arrays([kind, pa.array([""] * len(bare), pa.string())])
    text = pa.concat_arrays([text, pa.array([""] * len(bare), pa.string())])
    order = pa.array(np.argsort(rows, kind="stable"))
    return References(text.take(order), kind.take(order), np.bincount(rows, minlength=n).astype(np.int64))


def build_index(image_ids: list[str], references: References, max_order: int = 4) -> BleuIndex:
    """The BLEU index of these images over their references (words split as the tokenizer splits them)."""
    return BleuIndex(image_ids, words_array(references.texts), references.counts, max_order)
