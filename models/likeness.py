"""Learned likeness: a head on the memory's vectors, trained with a triplet loss so that images whose texts
say the same things come closer than images whose texts share no content word.

The memory's space (models.neighbours: centred encoder features on their principal axes) knows objects, not
what people call them. The head is one dense layer without bias on that space, started at the identity (so
epoch 0 is the raw space), its output L2-normalised. A linear map keeps a direction's scale out of it, so the
head folds into the memory's basis (Memory.learned): the memory, its prototypes, the neighbour references, the
stored likeness vectors and image queries' pictures all move into its space with no other change.

Pairs: where the data set gives every image a category, positive when two images share it and negative
otherwise; else positive when the TF-IDF cosine of two images' content words (stop words out) reaches POSITIVE,
negative when it stays below NEGATIVE (they share no content word, or only words most images have: a word
every image has weighs nothing), and the rest are neither. Triplets are mined in each batch, semi-hard
(Schroff et al., FaceNet, 2015): for an anchor and a positive, the most similar negative that is still less
similar than the positive, else the least similar negative. The epoch kept is the one with the best
image-to-image mAP@10 (relevant: the positives) on the dev images, epoch 0 included: a head that does not
help is not used.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from cbir.text import words
from models.neighbours import _unit  # the memory's own normalisation: the head's space is the memory's

MEASURED = 2_000  # images whose mAP@10 picks the epoch: every pair of them is compared
POSITIVE = 0.3  # the TF-IDF cosine of content words from which two images are a positive pair
NEGATIVE = 0.05  # and below which they are a negative one (only words most images have in common)
# Function words say nothing of what a picture shows (a short list: the data sets' texts are short titles
# and captions; a word missing here is weighted down by its IDF anyway).
STOP_WORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have having
    he her here hers him his how i if in into is it its itself just me more most my no nor not now of off on
    once only or other our out over own same she should so some such than that the their them then there these
    they this those through to too under until up very was we were what when where which while who whom why
    will with you your image picture photo""".split()
)


def content_words(texts: list[str]) -> set[str]:
    return {word for text in texts for word in words(text) if word not in STOP_WORDS and not word.isdigit()}


class TextWeights:
    """Each image's content words with their IDF weight (log(n / df) over these images), as a unit vector: the cosine of
    two rows is their relevance. Kept sparse (a row's own words): a batch's relevance is built when asked."""

    def __init__(self, texts: list[list[str]]):
        bags = [sorted(content_words(image)) for image in texts]
        counts = Counter(word for bag in bags for word in bag)
        ids = {word: i for i, word in enumerate(sorted(counts))}
        self.rows = []
        for bag in bags:
            weights = np.array([math.log(len(bags) / counts[word]) for word in bag], np.float32)
            self.rows.append(
                (np.array([ids[word] for word in bag], np.int64), weights / max(np.linalg.norm(weights), 1e-12))
            )

    def relevance(self, rows) -> np.ndarray:
        """(b, b) float32: the TF-IDF cosine of each pair of these rows' content words."""
        picked = [self.rows[i] for i in rows]
        words_seen, local = np.unique(
            np.concatenate([ids for ids, _ in picked] + [np.zeros(0, np.int64)]), return_inverse=True
        )
        matrix = np.zeros((len(picked), len(words_seen)), np.float32)
        at = 0
        for row, (ids, weights) in enumerate(picked):
            matrix[row, local[at : at + len(ids)]] = weights
            at += len(ids)
        return matrix @ matrix.T


class Categories:
    """Images' categories as relevance: 1 for two images of one category, 0 otherwise (TextWeights' interface)."""

    def __init__(self, labels: list[str]):
        self.labels = np.unique(np.asarray(labels), return_inverse=True)[1]

    def relevance(self, rows) -> np.ndarray:
        picked = self.labels[np.asarray(list(rows), np.int64)]
        return (picked[:, None] == picked[None, :]).astype(np.float32)


def relevance_of(texts: list[list[str]], labels: list[str] | None) -> TextWeights | Categories:
    return TextWeights(texts) if labels is None else Categories(labels)


def ranked_at_10(vectors: np.ndarray, relevant: np.ndarray) -> tuple[float, float]:
    """Image to image, over the images with a relevant other: each one's ten most alike others (cosine of unit
    vectors) against relevant[i] (bool, (n, n)): (mAP@10, recall@10: a relevant image among the ten)."""
    similarity = vectors.astype(np.float32) @ vectors.astype(np.float32).T
    np.fill_diagonal(similarity, -np.inf)
    relevant = relevant.copy()
    np.fill_diagonal(relevant, False)
    precisions, found = [], []
    for row in np.flatnonzero(relevant.any(axis=1)):
        hits = relevant[row, np.argsort(-similarity[row], kind="stable")[:10]]
        precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        precisions.append(float((precision * hits).sum() / min(relevant[row].sum(), 10)))
        found.append(float(hits.any()))
    return (float(np.mean(precisions)), float(np.mean(found))) if precisions else (0.0, 0.0)


@dataclass
class Head:
    weights: np.ndarray  # (d, d) float32: the memory's unit vectors @ weights, L2-normalised, is the learned space
    history: list[dict[str, float]]  # per epoch: loss, map_at_10 (epoch 0: the raw space)
    best_epoch: int  # 0: the raw space is best, the head is not used
    measured_on: str  # dev, or train when there are no dev images with a positive

    @property
    def used(self) -> bool:
        return self.best_epoch > 0

    def summary(self) -> dict:
        return {
            "used": self.used,
            "dim": int(self.weights.shape[1]),
            "epochs_run": len(self.history) - 1,
            "best_epoch": self.best_epoch,
            "measured_on": self.measured_on,
            "map_at_10": {"raw": self.history[0]["map_at_10"], "learned": self.history[self.best_epoch]["map_at_10"]},
            "history": self.history,
        }


def fit_head(
    train: np.ndarray,
    train_texts: list[list[str]],
    dev: np.ndarray,
    dev_texts: list[list[str]],
    *,
    train_labels: list[str] | None = None,
    dev_labels: list[str] | None = None,
    epochs: int,
    margin: float,
    batch_size: int = 128,
    learning_rate: float = 1e-2,
    seed: int = 0,
) -> Head:
    """Fit the head on the train images' unit vectors (the memory's space) and their texts (or categories:
    `*_labels`); keep the epoch with the best mAP@10 on the dev images (a seeded sample of MEASURED at most)."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    dim = train.shape[1]
    layer = keras.layers.Dense(dim, use_bias=False, kernel_initializer="identity")
    layer.build((None, dim))
    optimizer = keras.optimizers.Adam(learning_rate)
    texts = relevance_of(train_texts, train_labels)
    measured_on, check, check_related = "dev", *_sample(dev, dev_texts, dev_labels, rng)
    if not (np.triu(check_related, 1) >= POSITIVE).any():  # no dev pair to tell better from worse
        measured_on, check, check_related = "train", *_sample(train, train_texts, train_labels, rng)

    @tf.function(reduce_retracing=True)
    def step(x, related):
        with tf.GradientTape() as tape:
            embedded = tf.math.l2_normalize(layer(x), axis=1)
            loss = semi_hard_loss(embedded @ tf.transpose(embedded), related, margin)
        optimizer.apply_gradients(zip(tape.gradient(loss, layer.trainable_variables), layer.trainable_variables))
        return loss

    def measure() -> float:
        return ranked_at_10(_unit(check @ layer.kernel.numpy()), check_related >= POSITIVE)[0]

    history = [{"loss": float("nan"), "map_at_10": measure()}]
    best, best_weights = 0, layer.kernel.numpy()
    x = train.astype(np.float32)
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(x))
        batches = [order[at : at + batch_size] for at in range(0, len(order), batch_size)]
        losses = [float(step(x[batch], texts.relevance(batch))) for batch in batches if len(batch) > 2]
        history.append({"loss": float(np.mean(losses)) if losses else 0.0, "map_at_10": measure()})
        if history[-1]["map_at_10"] > history[best]["map_at_10"]:
            best, best_weights = epoch, layer.kernel.numpy()
    return Head(best_weights.astype(np.float32), history, best, measured_on)


def _sample(
    vectors: np.ndarray, texts: list[list[str]], labels: list[str] | None, rng
) -> tuple[np.ndarray, np.ndarray]:
    """At most MEASURED of these images (seeded) and their relevance: mAP@10 compares every pair."""
    rows = np.sort(rng.choice(len(texts), min(MEASURED, len(texts)), replace=False))
    picked = relevance_of([texts[i] for i in rows], None if labels is None else [labels[i] for i in rows])
    return vectors[rows].astype(np.float32), picked.relevance(range(len(rows)))


def semi_hard_loss(similarity, related, margin: float):
    """The mean triplet loss max(0, margin - sim(a, p) + sim(a, n)) over the batch's anchor-positive pairs
    that have a negative, n chosen semi-hard (see the module's docstring); similarity: cosines, (b, b)."""
    import tensorflow as tf

    size = tf.shape(similarity)[0]
    off_diagonal = ~tf.eye(size, dtype=tf.bool)
    positive = (related >= POSITIVE) & off_diagonal
    negative = related < NEGATIVE
    anchor_positive = similarity[:, :, None]  # (a, p, 1)
    anchor_negative = similarity[:, None, :]  # (a, 1, n)
    negatives = tf.broadcast_to(negative[:, None, :], tf.shape(anchor_positive - anchor_negative))
    semi_hard = negatives & (anchor_negative < anchor_positive)
    hardest_below = tf.reduce_max(tf.where(semi_hard, anchor_negative, -2.0), axis=2)
    easiest = tf.reduce_min(tf.where(negatives, anchor_negative, 2.0), axis=2)
    chosen = tf.where(tf.reduce_any(semi_hard, axis=2), hardest_below, easiest)
    valid = positive & tf.reduce_any(negative, axis=1)[:, None]
    losses = tf.where(valid, tf.nn.relu(margin - similarity + chosen), 0.0)
    return tf.reduce_sum(losses) / tf.maximum(tf.reduce_sum(tf.cast(valid, tf.float32)), 1.0)
