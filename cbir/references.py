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

from cbir.bleu import BleuParams, matches, score
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

    def matched(self, query: list[str], rows: list[int], params: BleuParams) -> list[tuple[str, str] | None]:
        """Why each of these images (rows) matched the query: its (kind, text) that shares the most words with
        it, among equals the one that alone scores best, then the first; None when none shares a word."""
        counts = self.counts[rows]
        at = (
            np.arange(counts.sum())
            - np.repeat(np.cumsum(counts) - counts, counts)
            + np.repeat(self.starts[rows], counts)
        )
        at = pa.array(at, pa.int64())
        taken = self.texts.take(at)
        texts, kinds = taken.to_pylist(), self.kinds.take(at).to_pylist()
        split = words_array(taken).to_pylist()  # one Arrow call, not a regex per text
        asked, out, first = set(query), [], 0
        for n in counts.tolist():
            shared = [len(asked.intersection(split[i])) for i in range(first, first + n)]
            most = max(shared, default=0)
            tied = [first + i for i, count in enumerate(shared) if count == most] if most else []
            if len(tied) > 1:  # few: the texts that share as many words; BLEU decides between them
                scores = [
                    score(matches(query, [split[i]], params.max_order), len(query), len(split[i]), params) for i in tied
                ]
                tied = [tied[scores.index(max(scores))]]
            out.append((kinds[tied[0]], texts[tied[0]]) if tied else None)
            first += n
        return out


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
