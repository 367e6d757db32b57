"""The merge captioner: image features -> dense; tokens -> embedding -> LSTM; add -> dense -> next word.

Training uses teacher forcing on whole captions: position t sees the image and words < t and
predicts word t, which is the classic prefix-by-prefix merge model computed in one pass.
Decoding reuses the same layers one step at a time, carrying the LSTM state, for a whole
batch of images per step: greedy or beam search, each caption with its log-probability. A caption
has at least one word: an empty one describes nothing and no query can find its image.
"""

from __future__ import annotations

import numpy as np

from models.tokenizer import Tokenizer


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
            raise ValueError(f"the model predicts {model.output_shape[-1]} words but the tokenizer has {len(tokenizer)}")
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

    def _step(self, last: np.ndarray, h: np.ndarray, c: np.ndarray, image: np.ndarray, first: bool = False):
        """One word for every row: (log-probabilities over the vocabulary, new h, new c).

        The first word is never the end: a little-trained model often ends at once."""
        log_probs, h, c = (out.numpy() for out in self._step_fn(last.astype(np.int32), h, c, image))
        if first:
            log_probs[:, self.tokenizer.end] = -np.inf
        return log_probs, h, c

    def decode(self, features: np.ndarray, method: str = "greedy", beam_width: int = 3,
               batch_size: int = 64) -> list[tuple[str, float]]:
        """Features (n, feature_dim) -> [(caption, log-probability)], batch_size images per model call."""
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"features must be (n, {self.feature_dim}), got {features.shape}")
        results: list[tuple[str, float]] = []
        if method not in ("greedy", "beam"):
            raise ValueError(f"decode method is greedy or beam, not {method}")
        for start in range(0, len(features), batch_size):
            batch = features[start:start + batch_size]
            tokens, scores = self._beam(batch, beam_width) if method == "beam" else self._greedy(batch)
            results += [(self.tokenizer.decode(row), float(score)) for row, score in zip(tokens, scores)]
        return results

    def _greedy(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(features)
        image = self._image(features)
        h = c = np.zeros((n, self.units), np.float32)
        last = np.full((n, 1), self.tokenizer.start, np.int32)
        tokens = np.zeros((n, self.max_length), np.int32)
        scores = np.zeros(n, np.float64)
        done = np.zeros(n, bool)
        for t in range(self.max_length):
            log_probs, h, c = self._step(last, h, c, image, first=t == 0)
            best = log_probs.argmax(axis=1)
            scores += np.where(done, 0.0, log_probs[np.arange(n), best])
            tokens[:, t] = np.where(done, self.tokenizer.pad, best)
            done |= best == self.tokenizer.end
            last = best[:, None]
            if done.all():
                break
        return tokens, scores

    def _beam(self, features: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        n, vocab, end, pad = len(features), len(self.tokenizer), self.tokenizer.end, self.tokenizer.pad
        image = np.repeat(self._image(features), width, axis=0)  # (n * width, units)
        h = c = np.zeros((n * width, self.units), np.float32)
        last = np.full((n * width, 1), self.tokenizer.start, np.int32)
        tokens = np.zeros((n, width, self.max_length), np.int32)
        scores = np.full((n, width), -np.inf)
        scores[:, 0] = 0.0  # the beams start identical: keep one
        done = np.zeros((n, width), bool)
        for t in range(self.max_length):
            log_probs, h, c = self._step(last, h, c, image, first=t == 0)
            candidates = scores[:, :, None] + log_probs.reshape(n, width, vocab)
            # A finished beam continues only with padding, at no cost.
            candidates[done] = -np.inf
            candidates[done, pad] = scores[done]
            flat = top_k(candidates.reshape(n, width * vocab), width)
            beam, word = flat // vocab, flat % vocab
            scores = np.take_along_axis(candidates.reshape(n, -1), flat, axis=1)
            tokens = np.take_along_axis(tokens, beam[:, :, None], axis=1)
            tokens[:, :, t] = word
            done = np.take_along_axis(done, beam, axis=1) | (word == end)
            rows = (np.arange(n)[:, None] * width + beam).ravel()
            h, c, last = h[rows], c[rows], word.reshape(-1, 1)
            if done.all():
                break
        return tokens[:, 0], scores[:, 0]


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest per row, highest first; ties go to the lower index, as argmax does."""
    if k == 1:
        return scores.argmax(axis=1)[:, None]
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    values = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -values), axis=1)
    return np.take_along_axis(part, order, axis=1)
