"""The rules every query meets, wherever it comes from (a query file, cbir search, the API, the page):
one check of its words and its length."""

from __future__ import annotations

from cbir.errors import UsageError
from cbir.text import words

WORD_CHARS = 50  # a text query has at most this many characters per word of query.max_words


def too_long(text: str | None, limit: int) -> str | None:
    """Why a text query is refused for its length, or None; a text over limit * WORD_CHARS characters is
    refused before its words are counted (one long "word" would pass the word cap)."""
    if text and len(text) > (most := limit * WORD_CHARS):
        return f"the text has {len(text)} characters, over {most} (query.max_words={limit} x {WORD_CHARS})"
    count = len(words(text))
    return f"the text has {count} words, over query.max_words={limit}" if count > limit else None


class QueryRefused(UsageError):
    """A query that cannot be asked: a reason slug (an error row's reason, an API's) and a sentence."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def query_words(text: str | None, max_words: int, what: str = "the query") -> list[str]:
    """The words of a text to search for; QueryRefused when it is too long or has no words."""
    if long := too_long(text, max_words):  # before anything else reads the whole text
        raise QueryRefused("too-long", f"{what} is too long: {long}")
    if not (found := words(text)):
        raise QueryRefused("empty-text", f"{what} has no words")
    return found
