"""Caption text -> words: the one normalisation shared by the tokenizer, the index and BLEU ranking."""

from __future__ import annotations

import re
import unicodedata

START, END = "startseq", "endseq"
_NOT_WORD = re.compile(r"[^\w\s]|_")


def words(text: str | None) -> list[str]:
    """Lowercase, punctuation stripped, split on whitespace; the start/end markers are dropped."""
    if not text:
        return []
    text = _NOT_WORD.sub(" ", unicodedata.normalize("NFKC", text).lower())
    return [word for word in text.split() if word not in (START, END)]
