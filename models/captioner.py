"""The merge captioner: image features -> dense; tokens -> embedding -> LSTM; add -> dense -> next word.

Training uses teacher forcing on whole captions: position t sees the image and words < t and
predicts word t, which is the classic prefix-by-prefix merge model computed in one pass.
Decoding reuses the same layers one step at a time, carrying the LSTM state, for a whole
batch of images per step: greedy or beam search, each caption with its log-probability, and with
beam search the n best distinct captions of an image. A caption has at least one word: an empty
one describes nothing and no query can find its image. Decoding can block loops (a word right after
itself, an n-gram twice), which little-trained models fall into: "face face face", "of of of".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.tokenizer import Tokenizer


@dataclass(frozen=True)
class Decoding:
    """How captions are decoded (settings captioner.decode, beam_width, captions_per_image, ...)."""

    method: str = "greedy"  # greedy or beam
    beam_width: int = 3
    captions: int = 1  # distinct captions per image at most, best first (greedy finds one, beam up to its width)
    no_repeat_ngram: int = 0  # 0: off; n: no word right after itself, and no n-gram twice
    length_penalty: float = 0.0  # beam: the beams are ranked by log-probability / length ** this

    @classmethod
    def from_settings(cls, captioner) -> Decoding:
        return cls(
            captioner.decode,
            captioner.beam_width,
            captioner.captions_per_image,
            captioner.no_repeat_ngram,
            captioner.length_penalty,
        )

    def __post_init__(self):
        if self.method not in ("greedy", "beam"):
            raise ValueError(f"decode method is greedy or beam, not {self.method}")


GREEDY = Decoding()


def build_model(vocab_size: int, max_length: int, feature_dim: int, embedding_dim: int, units: int, dropout: float):
    import keras
    from keras import layers

    features = keras.Input((feature_dim,), name="features")
    image = layers.Dropout(dropout, name="image_dropout")(features)
    image = layers.Dense(units, activation="relu", name="image_dense")(image)
    image = layers.Reshape((1, units), name="image_per_step")(image)

    tokens = keras.Input((max_length,), dtype="int32", name="tokens")
    words = layers.Embedding(vocab_size, embedding_dim, mask_zero=True, name="embedding")(tokens)
    words = layers.Dropout(dropout, name="words_dropout")(words)
    words, _, _ = layers.LSTM(units, return_sequences=True, return_state=True, name="lstm")(words)

    merged = layers.Add(name="merge")([image, words])
    merged = layers.Dense(units, activation="relu", name="merge_dense")(merged)
    logits = layers.Dense(vocab_size, name="logits")(merged)
    return keras.Model([features, tokens], logits, name="captioner")


class Captioner:
    """A trained model and its tokenizer: decode many images' features at once."""

    def __init__(self, model, tokenizer: Tokenizer):
        import keras
        import tensorflow as tf
        from keras import layers

        if model.output_shape[-1] != len(tokenizer):
            raise ValueError(
                f"the model predicts {model.output_shape[-1]} words but the tokenizer has {len(tokenizer)}"
            )
        self.model, self.tokenizer = model, tokenizer
        self.feature_dim = model.input_shape[0][-1]
        self.max_length = model.input_shape[1][-1]
        units = model.get_layer("image_dense").units

        image_model = keras.Model(model.get_layer("features").output, model.get_layer("image_dense").output)
        token = keras.Input((1,), dtype="int32")
        state_h, state_c, image = keras.Input((units,)), keras.Input((units,)), keras.Input((units,))
        out, h, c = model.get_layer("lstm")(model.get_layer("embedding")(token), initial_state=[state_h, state_c])
        merged = layers.Add()([layers.Reshape((1, units))(image), out])
        logits = model.get_layer("logits")(model.get_layer("merge_dense")(merged))
        step_model = keras.Model([token, state_h, state_c, image], [layers.Reshape((-1,))(logits), h, c])

        # Words a caption never contains: padding, unknown, and a second start.
        banned = np.zeros(len(tokenizer), np.float32)
        banned[[tokenizer.pad, tokenizer.unk, tokenizer.start]] = -np.inf

        def step(token, h, c, image):
            logits, h, c = step_model([token, h, c, image], training=False)
            return tf.nn.log_softmax(logits + banned), h, c

        # One trace each, whatever the batch size.
        rows = lambda width, dtype=tf.float32: tf.TensorSpec([None, width], dtype)  # noqa: E731
        self._image_fn = tf.function(lambda f: image_model(f, training=False), input_signature=[rows(self.feature_dim)])
        self._step_fn = tf.function(step, input_signature=[rows(1, tf.int32), rows(units), rows(units), rows(units)])
        self.units = units

    def _image(self, features: np.ndarray) -> np.ndarray:
        return self._image_fn(features).numpy()

    def _step(
        self, last: np.ndarray, h: np.ndarray, c: np.ndarray, image: np.ndarray, history: np.ndarray, no_repeat: int
    ):
        """One word for every row: (log-probabilities over the vocabulary, new h, new c).

        The first word is never the end (a little-trained model often ends at once), and with
        no_repeat, no word follows itself and no n-gram of that size comes twice (a caption loop)."""
        log_probs, h, c = (out.numpy() for out in self._step_fn(last.astype(np.int32), h, c, image))
        if not history.shape[1]:
            log_probs[:, self.tokenizer.end] = -np.inf
        elif no_repeat:
            log_probs[repeats(history, no_repeat)] = -np.inf
        return log_probs, h, c

    def decode(
        self, features: np.ndarray, decoding: Decoding = GREEDY, batch_size: int = 64
    ) -> list[list[tuple[str, float]]]:
        """Features (n, feature_dim) -> for each image its decoding.captions best distinct captions,
        [(caption, log-probability)], best first; batch_size images per model call."""
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"features must be (n, {self.feature_dim}), got {features.shape}")
        results: list[list[tuple[str, float]]] = []
        for start in range(0, len(features), batch_size):
            batch = features[start : start + batch_size]
            if decoding.method == "beam":
                results += self._beam(batch, decoding)
            else:
                tokens, scores = self._greedy(batch, decoding.no_repeat_ngram)
                results += [[(self.tokenizer.decode(row), float(score))] for row, score in zip(tokens, scores)]
        return results

    def _greedy(self, features: np.ndarray, no_repeat: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(features)
        image = self._image(features)
        h = c = np.zeros((n, self.units), np.float32)
        last = np.full((n, 1), self.tokenizer.start, np.int32)
        tokens = np.zeros((n, self.max_length), np.int32)
        scores = np.zeros(n, np.float64)
        done = np.zeros(n, bool)
        for t in range(self.max_length):
            log_probs, h, c = self._step(last, h, c, image, tokens[:, :t], no_repeat)
            best = log_probs.argmax(axis=1)
            scores += np.where(done, 0.0, log_probs[np.arange(n), best])
            tokens[:, t] = np.where(done, self.tokenizer.pad, best)
            done |= best == self.tokenizer.end
            last = best[:, None]
            if done.all():
                break
        return tokens, scores

    def _beam(self, features: np.ndarray, decoding: Decoding) -> list[list[tuple[str, float]]]:
        n, width, vocab = len(features), decoding.beam_width, len(self.tokenizer)
        end, pad = self.tokenizer.end, self.tokenizer.pad
        image = np.repeat(self._image(features), width, axis=0)  # (n * width, units)
        h = c = np.zeros((n * width, self.units), np.float32)
        last = np.full((n * width, 1), self.tokenizer.start, np.int32)
        tokens = np.zeros((n, width, self.max_length), np.int32)
        scores = np.full((n, width), -np.inf)
        scores[:, 0] = 0.0  # the beams start identical: keep one
        done = np.zeros((n, width), bool)
        lengths = np.zeros((n, width))  # words so far, the end included
        for t in range(self.max_length):
            history = tokens[:, :, :t].reshape(n * width, t)
            log_probs, h, c = self._step(last, h, c, image, history, decoding.no_repeat_ngram)
            candidates = scores[:, :, None] + log_probs.reshape(n, width, vocab)
            # A finished beam continues only with padding, at no cost.
            candidates[done] = -np.inf
            candidates[done, pad] = scores[done]
            # Beams compete by log-probability over length ** length_penalty (0: none), so a caption
            # that ends early does not push out longer ones only for having fewer words to pay for.
            grown = np.broadcast_to(np.where(done, lengths, t + 1)[:, :, None], candidates.shape).reshape(n, -1)
            ranked = candidates.reshape(n, -1) / grown**decoding.length_penalty
            flat = top_k(ranked, width)
            beam, word = flat // vocab, flat % vocab
            scores = np.take_along_axis(candidates.reshape(n, -1), flat, axis=1)
            lengths = np.take_along_axis(grown, flat, axis=1)
            tokens = np.take_along_axis(tokens, beam[:, :, None], axis=1)
            tokens[:, :, t] = word
            done = np.take_along_axis(done, beam, axis=1) | (word == end)
            rows = (np.arange(n)[:, None] * width + beam).ravel()
            h, c, last = h[rows], c[rows], word.reshape(-1, 1)
            if done.all():
                break
        ranked = np.argsort(-(scores / np.maximum(lengths, 1) ** decoding.length_penalty), axis=1, kind="stable")
        out = []
        for i in range(n):
            best: dict[str, float] = {}
            for b in ranked[i]:
                caption = self.tokenizer.decode(tokens[i, b])
                if np.isfinite(scores[i, b]) and caption not in best and len(best) < decoding.captions:
                    best[caption] = float(scores[i, b])
            out.append(list(best.items()))
        return out


def repeats(history: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, words) that must not come next: the last word again, or a word that would make an
    n-gram of the row's history appear twice (n = 1: any word it has). history: (rows, t) of word ids."""
    rows, t = history.shape
    if n == 1:
        return np.repeat(np.arange(rows), t), history.ravel()
    blocked_rows, blocked_words = [np.arange(rows)], [history[:, -1]]
    if n >= 2 and t >= n:
        tail = history[:, t - n + 1 :]  # the n-1 words the next word would extend
        windows = np.lib.stride_tricks.sliding_window_view(history[:, :-1], n - 1, axis=1)  # (rows, t-n+1, n-1)
        row, at = np.nonzero((windows == tail[:, None, :]).all(axis=2))
        blocked_rows.append(row)
        blocked_words.append(history[row, at + n - 1])
    return np.concatenate(blocked_rows), np.concatenate(blocked_words)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest per row, highest first; ties go to the lower index, as argmax does."""
    if k == 1:
        return scores.argmax(axis=1)[:, None]
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    values = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -values), axis=1)
    return np.take_along_axis(part, order, axis=1)
