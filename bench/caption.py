"""Caption decoding and encoder throughput.

Decoding: batched greedy and beam search (64 images a batch) against the seed tutorial's way,
one `model.predict` per word per image, on the same model and features in the same run; the
captions of the loop and of batched greedy must be identical. The model is untrained but
full-sized (vocabulary 5,000, 256 units, 4096-d features, 20 words), so every method decodes
the same number of steps. Encoder: VGG16 fc2 images/s at batch 1, 16 and 64.

    .venv/bin/python -m bench.caption

Prints a table, then one JSON line: batched_greedy_img_s, batched_beam_img_s,
per_word_loop_img_s, encoder_img_s (by batch size), greedy_speedup.
"""

from __future__ import annotations

import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from models.captioner import GREEDY, Captioner, Decoding, build_model
from models.encoders import VGG16
from models.tokenizer import SPECIALS, Tokenizer

VOCABULARY, MAX_LENGTH, FEATURES, UNITS = 5000, 20, 4096, 256


def per_word_loop(captioner: Captioner, feature: np.ndarray) -> str:
    """The tutorial's decoder: pad the words so far, predict, take the best next word, repeat."""
    tokenizer, model = captioner.tokenizer, captioner.model
    words = [tokenizer.start]
    for _ in range(MAX_LENGTH):
        sequence = np.zeros((1, MAX_LENGTH), np.int32)
        sequence[0, : len(words)] = words
        logits = model.predict([feature[None, :], sequence], verbose=0)[0, len(words) - 1]
        logits[[tokenizer.pad, tokenizer.unk, tokenizer.start]] = -np.inf  # as the batched decoder does
        words.append(int(logits.argmax()))
        if words[-1] == tokenizer.end:
            break
    return tokenizer.decode(words)


def timed(function, *args) -> tuple[float, object]:
    started = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - started, result


def main() -> None:
    import keras

    keras.utils.set_random_seed(0)
    tokenizer = Tokenizer([*SPECIALS, *(f"w{i}" for i in range(VOCABULARY - len(SPECIALS)))])
    captioner = Captioner(build_model(VOCABULARY, MAX_LENGTH, FEATURES, 256, UNITS, 0.5), tokenizer)
    features = np.random.default_rng(0).normal(0, 1, (640, FEATURES)).astype(np.float32)
    beam = Decoding("beam", 3, captions=3, no_repeat_ngram=1, length_penalty=0.5)  # the default decoding
    captioner.decode(features[:64])  # trace the step function once, outside the timings
    captioner.decode(features[:64], beam)

    loop_n = 8
    loop_s, loop_captions = timed(lambda: [per_word_loop(captioner, f) for f in features[:loop_n]])
    greedy_s, greedy = timed(captioner.decode, features, GREEDY, 64)
    beam_s, _ = timed(captioner.decode, features, beam, 64)
    same = loop_captions == [best[0][0] for best in greedy[:loop_n]]

    encoder = VGG16("random")
    rng = np.random.default_rng(1)
    encoder_rates = {}
    for batch, images in ((1, 8), (16, 32), (64, 64)):
        pixels = rng.integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
        encoder.encode(pixels)  # warm up this batch shape
        seconds, _ = timed(lambda pixels=pixels, n=images // batch: [encoder.encode(pixels) for _ in range(n)])
        encoder_rates[str(batch)] = round(images / seconds, 2)

    rates = {
        "per_word_loop": loop_n / loop_s,
        "batched_greedy": len(features) / greedy_s,
        "batched_beam": len(features) / beam_s,
    }
    print(f"{'decoder':<34}{'images':>8}{'seconds':>10}{'images/s':>11}")
    for name, n, seconds in (
        ("per-word predict loop (baseline)", loop_n, loop_s),
        ("batched greedy, batch 64", len(features), greedy_s),
        ("batched beam width 3, 3 best, no repeats", len(features), beam_s),
    ):
        print(f"{name:<34}{n:>8}{seconds:>10.2f}{n / seconds:>11.1f}")
    print(
        f"batched greedy is {rates['batched_greedy'] / rates['per_word_loop']:.0f}x the loop; "
        f"captions identical to the loop's: {same}"
    )
    print(f"{'VGG16 fc2 encoder, batch':<34}" + "".join(f"{b:>8}" for b in encoder_rates))
    print(f"{'images/s':<34}" + "".join(f"{r:>8}" for r in encoder_rates.values()))
    print(f"({os.cpu_count()} cores; vocabulary {VOCABULARY}, {UNITS} units, {MAX_LENGTH} words)")
    print(
        json.dumps(
            {
                "batched_greedy_img_s": round(rates["batched_greedy"], 1),
                "batched_beam_img_s": round(rates["batched_beam"], 1),
                "per_word_loop_img_s": round(rates["per_word_loop"], 2),
                "greedy_speedup": round(rates["batched_greedy"] / rates["per_word_loop"], 1),
                "loop_and_greedy_captions_equal": same,
                "encoder_img_s": encoder_rates,
            }
        )
    )


if __name__ == "__main__":
    main()
