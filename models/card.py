"""The model card: what a captioner version was trained on, how, and how well; card.json beside the model.

Typed, with the JSON on disk unchanged: fields are in the order cbir has always written them, keys
a card does not have stay absent, and keys this code does not know (a newer card) are kept. Loading
a captioner needs only its encoder; `cbir train` writes every part.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow")

    def __getitem__(self, key: str) -> Any:
        """Read access by key, as the card's JSON reads (bench scripts and not yet typed callers)."""
        value = getattr(self, key, None)
        if value is None and key not in self.model_fields_set and key not in (self.model_extra or {}):
            raise KeyError(key)
        return value


class DatasetInfo(_Part):
    uri: str
    kind: str
    captions: dict[str, int]  # per split: train, dev, test
    images: dict[str, int]
    skipped: dict[str, int]  # rows left out, by reason


class EncoderInfo(_Part):
    name: str
    weights: str  # as shown: imagenet, random (tests only ...), a file
    weights_source: str | None = None  # cards before it said where the weights came from lack it
    key: str  # the features it reads: <name>-<weights>
    feature_dim: int
    features_computed: int = 0


class Sizes(_Part):
    vocabulary: int
    max_length: int
    embedding_dim: int | None = None
    units: int | None = None
    dropout: float | None = None
    min_word_count: int | None = None
    memory_images: int | None = None  # training images remembered for neighbours (models/neighbours.py)
    memory_dim: int | None = None


class Training(_Part):
    epochs_run: int
    best_epoch: int
    history: list[dict[str, float]]
    batch_size: int
    learning_rate: float
    seed: int
    monitor: str
    label_smoothing: float
    seconds: float


class Metrics(_Part):
    test_images: int
    decoding: dict[str, Any]  # models.captioner.Decoding's fields
    greedy: dict[str, float] | None = None  # corpus BLEU-1..4 and caption stats; absent without test captions
    configured: dict[str, float] | None = None


class LikenessInfo(_Part):
    """The learned likeness (models.likeness): image-to-image mAP@10 of the raw space and of the head."""

    used: bool  # false: the raw space measured better, and the memory keeps it
    dim: int
    epochs_run: int
    best_epoch: int
    measured_on: str  # dev, or train when no dev pair was relevant
    map_at_10: dict[str, float]  # raw, learned
    history: list[dict[str, float]]  # per epoch from 0 (the raw space): loss, map_at_10


class ModelCard(_Part):
    created_at: str | None = None
    dataset: DatasetInfo | None = None
    encoder: EncoderInfo
    sizes: Sizes | None = None
    training: Training | None = None
    metrics: Metrics | None = None
    likeness: LikenessInfo | None = None  # cards of captioners trained without the head lack it
    software: dict[str, str] | None = None
    version: str | None = None  # set when saved: the version's run id

    def as_dict(self) -> dict:
        """The card as JSON data (what a flow returns, what card.json holds)."""
        return self.model_dump(mode="json", exclude_unset=True)

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelCard:
        return cls.model_validate_json(text)
