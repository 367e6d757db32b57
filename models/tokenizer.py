"""Caption tokenizer: words by frequency, an unknown token, and the startseq/endseq markers; saved as JSON."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable

from cbir.text import END, START, words

PAD, UNK = "<pad>", "<unk>"
SPECIALS = (PAD, UNK, START, END)  # ids 0..3; 0 is padding, masked everywhere


class Tokenizer:
    def __init__(self, vocabulary: list[str]):
        if tuple(vocabulary[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary starts with {', '.join(SPECIALS)}")
        self.vocabulary = list(vocabulary)
        self.ids = {word: i for i, word in enumerate(self.vocabulary)}
        self.pad, self.unk, self.start, self.end = range(len(SPECIALS))

    @classmethod
    def fit(cls, captions: Iterable[str], min_count: int = 1) -> Tokenizer:
        """Words seen at least min_count times, most frequent first (ties alphabetical, so fits are repeatable)."""
        counts = Counter(word for caption in captions for word in words(caption))
        kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls([*SPECIALS, *kept])

    def __len__(self) -> int:
        return len(self.vocabulary)

    def encode(self, caption: str) -> list[int]:
        return [self.start, *(self.ids.get(word, self.unk) for word in words(caption)), self.end]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> caption text, without markers or padding; stops at endseq."""
        out = []
        for i in ids:
            if i == self.end:
                break
            if i not in (self.pad, self.start):
                out.append(self.vocabulary[i])
        return " ".join(out)

    def to_json(self) -> str:
        return json.dumps({"vocabulary": self.vocabulary})

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        return cls(json.loads(text)["vocabulary"])
