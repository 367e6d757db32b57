"""Caption text -> words: the one normalisation shared by the tokenizer, the index and BLEU ranking."""

from __future__ import annotations

import io
import os
import re
import unicodedata
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

START, END = "startseq", "endseq"
_NOT_WORD = re.compile(r"[^\w\s]|_")


# Control characters (C0 but tab, DEL, C1: ESC and CSI start terminal sequences that can move the
# cursor, retitle the window or write the clipboard) and bidirectional overrides, which reorder text.
_UNPRINTABLE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """Text from outside (captions, titles, URLs, server messages) made safe to print to a terminal."""
    return _UNPRINTABLE.sub("\ufffd", text)


def words(text: str | None) -> list[str]:
    """Lowercase, punctuation stripped, split on whitespace; the start/end markers are dropped."""
    if not text:
        return []
    text = _NOT_WORD.sub(" ", unicodedata.normalize("NFKC", text).lower())
    return [word for word in text.split() if word not in (START, END)]


def highlight(text: str, query: list[str]) -> list[tuple[str, bool]]:
    """The text in pieces, each with whether it is a word of the query (as words() sees it): for showing
    people which words of a result matched. Joining the pieces gives the text back."""
    wanted = set(query)
    pieces = re.split(r"(\w+)", text or "")
    return [
        (piece, bool(piece) and (found := words(piece)) != [] and set(found) <= wanted) for piece in pieces if piece
    ]


# Plain ASCII without control characters (tab, newline and carriage return allowed) is split by
# Arrow's kernels; anything else goes through words() itself, so both give the same lists.
_CONTROL = "[\\x00-\\x08\\x0b-\\x1f\\x7f]"


def words_array(texts, chunk: int = 250_000) -> pa.ListArray:
    """words() of every text of a column (null -> no words), mostly computed in Arrow, chunks side by side."""
    texts = pa.array(texts, pa.string()) if not isinstance(texts, pa.Array) else texts.cast(pa.string())
    if len(texts) <= chunk:
        return _split(texts)
    with ThreadPoolExecutor(os.cpu_count()) as pool:  # Arrow's kernels release the GIL
        return pa.concat_arrays(list(pool.map(_split, [texts.slice(at, chunk) for at in range(0, len(texts), chunk)])))


def _split(texts: pa.StringArray) -> pa.ListArray:
    texts = pc.fill_null(texts, "")
    simple = pc.and_(pc.string_is_ascii(texts), pc.invert(pc.match_substring_regex(texts, _CONTROL)))
    split = pc.ascii_split_whitespace(pc.replace_substring_regex(pc.ascii_lower(texts), "[^a-z0-9 \t\n\r]", " "))
    tokens = split.flatten()
    keep = pc.and_(pc.not_equal(tokens, ""), pc.invert(pc.is_in(tokens, value_set=pa.array([START, END]))))
    values = tokens.filter(keep)
    lengths = np.bincount(pc.list_parent_indices(split).filter(keep).to_numpy(), minlength=len(texts))
    starts = np.cumsum(lengths) - lengths
    others = np.flatnonzero(~simple.to_numpy(zero_copy_only=False))
    if len(others):  # their words from Python, appended after Arrow's, and pointed at instead
        extra = [words(texts[int(i)].as_py()) for i in others]
        sizes = np.array([len(w) for w in extra], np.int64)
        starts[others] = len(values) + np.cumsum(sizes) - sizes
        lengths[others] = sizes
        values = pa.concat_arrays([values, pa.array([w for ws in extra for w in ws], pa.string())])
        take = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths) + np.repeat(starts, lengths)
        values = values.take(pa.array(take, pa.int64()))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)  # plain rows' tokens are in row order
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def render_table(title: str, rows: list[dict]) -> str:
    """Rows as a terminal table under a title, every value made printable (text from the web included)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table()
    for column in rows[0] if rows else []:
        table.add_column(column, justify="right" if isinstance(rows[0][column], (int, float)) else "left")
    for row in rows:
        table.add_row(*(escape(printable(str(value))) for value in row.values()))
    out = io.StringIO()
    console = Console(file=out, width=100, force_terminal=False)
    console.print(escape(printable(title)))
    console.print(table)
    return out.getvalue()
