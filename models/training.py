"""Training and evaluation: tf.data batches of (features, caption) pairs, early stopping, corpus BLEU.

Each caption is one training example: its tokens shifted by one give the next-word targets at
every position, so the expanded (prefix, next word) set is never built, in memory or on disk.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cbir.text import words
from models.captioner import GREEDY, Captioner, Decoding, build_model
from models.tokenizer import Tokenizer

BLEU_WEIGHTS = {
    "bleu1": (1.0, 0, 0, 0),
    "bleu2": (0.5, 0.5, 0, 0),
    "bleu3": (1 / 3, 1 / 3, 1 / 3, 0),
    "bleu4": (0.25, 0.25, 0.25, 0.25),
}


@dataclass
class Split:
    """Captions of one split: features[image_index[i]] is the image of captions[i]."""

    features: np.ndarray
    image_index: np.ndarray
    captions: list[str]
    categories: list[str] | None = None  # per image (features' rows), where the data set gives every one

    def __len__(self) -> int:
        return len(self.captions)


def sequences(tokenizer: Tokenizer, captions: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs [startseq w1 .. wn] and targets [w1 .. wn endseq], padded (0) or cut to max_length."""
    inputs = np.zeros((len(captions), max_length), np.int32)
    targets = np.zeros((len(captions), max_length), np.int32)
    for row, caption in enumerate(captions):
        ids = tokenizer.encode(caption)[: max_length + 1]
        inputs[row, : len(ids) - 1] = ids[:-1]
        targets[row, : len(ids) - 1] = ids[1:]
    return inputs, targets


def dataset(split: Split, tokenizer: Tokenizer, max_length: int, batch_size: int, shuffle_seed: int | None):
    """A tf.data pipeline of ((features, tokens), targets, weights); features are gathered per batch."""
    import tensorflow as tf

    inputs, targets = sequences(tokenizer, split.captions, max_length)
    table = tf.Variable(split.features, trainable=False)  # a variable, not a graph constant: no 2 GB limit
    data = tf.data.Dataset.from_tensor_slices((split.image_index.astype(np.int32), inputs, targets))
    if shuffle_seed is not None:
        data = data.shuffle(len(split), seed=shuffle_seed, reshuffle_each_iteration=True)

    def batch_of(index, tokens, target):
        weights = tf.cast(target != 0, tf.float32)  # padding teaches nothing
        return (tf.gather(table, index), tokens), target, weights

    return data.batch(batch_size).map(batch_of, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)


def fit(
    train: Split,
    dev: Split | None,
    tokenizer: Tokenizer,
    *,
    max_length: int,
    embedding_dim: int,
    units: int,
    dropout: float,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    patience: int,
    seed: int,
    monitor: str = "loss",
    label_smoothing: float = 0.0,
    decoding: Decoding = GREEDY,
    on_epoch: Callable[[int, dict], None] | None = None,
):
    """Train a new captioner; returns (Captioner, history as a list of per-epoch metrics).

    Training stops after `patience` epochs without a better dev loss (monitor "loss") or dev BLEU
    (monitor "bleu": the mean of corpus BLEU-1..4 of the dev images' captions, decoded as `decoding`
    says), and the best epoch's weights are kept. Without dev captions the training loss decides."""
    import keras

    keras.utils.set_random_seed(seed)
    model = build_model(len(tokenizer), max_length, train.features.shape[1], embedding_dim, units, dropout)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=smoothed_loss(label_smoothing)
        if label_smoothing
        else keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    captioner = Captioner(model, tokenizer)  # shares the model's layers: it decodes with the weights of the moment
    has_dev = dev is not None and len(dev) > 0
    if has_dev and monitor == "bleu":
        references = split_references(dev)
        callbacks = [dev_bleu_stopping(captioner, dev.features, references, decoding, patience)]
    else:
        callbacks = [
            keras.callbacks.EarlyStopping(
                monitor="val_loss" if has_dev else "loss", patience=patience, restore_best_weights=True
            )
        ]
    if on_epoch:
        callbacks.append(keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: on_epoch(epoch + 1, logs)))
    history = model.fit(
        dataset(train, tokenizer, max_length, batch_size, shuffle_seed=seed),
        validation_data=dataset(dev, tokenizer, max_length, batch_size, None) if has_dev else None,
        epochs=epochs,
        callbacks=callbacks,
        shuffle=False,  # the tf.data pipeline shuffles itself
        verbose=0,
    )
    per_epoch = [dict(zip(history.history, values)) for values in zip(*history.history.values())]
    return captioner, [{k: float(v) for k, v in row.items()} for row in per_epoch]


def split_references(split: Split) -> list[list[str]]:
    """All captions of each image of a split, in the order of its feature rows."""
    references: list[list[str]] = [[] for _ in range(len(split.features))]
    for index, caption in zip(split.image_index, split.captions):
        references[index].append(caption)
    return references


def smoothed_loss(epsilon: float):
    """Cross-entropy against targets smoothed by epsilon (spread over the vocabulary), one value a position."""
    import tensorflow as tf

    def loss(targets, logits):
        log_probs = tf.nn.log_softmax(logits)
        picked = tf.gather(log_probs, tf.cast(targets, tf.int32), batch_dims=2)
        return -(1 - epsilon) * picked - epsilon * tf.reduce_mean(log_probs, axis=-1)

    return loss


def dev_bleu_stopping(
    captioner: Captioner, features: np.ndarray, references: list[list[str]], decoding: Decoding, patience: int
):
    """A Keras callback: dev BLEU after each epoch (logged as val_bleu); stops after `patience` epochs
    without a better one and restores the best epoch's weights at the end."""
    import keras

    class DevBleu(keras.callbacks.Callback):
        best, best_weights, waited = -1.0, None, 0

        def on_epoch_end(self, epoch, logs=None):
            captions = [best[0][0] for best in captioner.decode(features, decoding)]
            bleu = float(np.mean(list(corpus_bleu(references, captions).values())))
            if logs is not None:
                logs["val_bleu"] = bleu
            if bleu > self.best:
                self.best, self.best_weights, self.waited = bleu, self.model.get_weights(), 0
            else:
                self.waited += 1
                self.model.stop_training = self.waited >= patience

        def on_train_end(self, logs=None):
            if self.best_weights is not None:
                self.model.set_weights(self.best_weights)

    return DevBleu()


def corpus_bleu(references: list[list[str]], hypotheses: list[str]) -> dict[str, float]:
    """BLEU-1..4 over a corpus: every reference caption of an image counts (nltk corpus_bleu)."""
    from nltk.translate.bleu_score import corpus_bleu as nltk_corpus_bleu

    refs = [[words(r) for r in group] for group in references]
    hyps = [words(h) for h in hypotheses]
    with warnings.catch_warnings():  # nltk warns when a higher order has no match; the score is then 0
        warnings.simplefilter("ignore")
        return {name: float(nltk_corpus_bleu(refs, hyps, weights=w)) for name, w in BLEU_WEIGHTS.items()}


def evaluate(
    captioner: Captioner,
    features: np.ndarray,
    references: list[list[str]],
    decodings: dict[str, Decoding],
    batch_size: int = 64,
) -> dict[str, dict[str, float]]:
    """For each named decoding: corpus BLEU-1..4 of the best captions, with caption_stats; one feature row
    and its reference captions per image."""
    scores = {}
    for name, decoding in decodings.items():
        captions = [best[0][0] for best in captioner.decode(features, decoding, batch_size)]
        scores[name] = {**corpus_bleu(references, captions), **caption_stats(captions)}
    return scores


def degenerate(caption: str) -> bool:
    """A caption that loops: a word right after itself, or any bigram twice."""
    tokens = words(caption)
    bigrams = list(zip(tokens, tokens[1:]))
    return any(a == b for a, b in bigrams) or len(set(bigrams)) < len(bigrams)


def caption_stats(captions: list[str]) -> dict[str, float]:
    """The share of degenerate captions and distinct captions per 100 images."""
    n = max(len(captions), 1)
    return {"degenerate": sum(map(degenerate, captions)) / n, "distinct_per_100": 100 * len(set(captions)) / n}
