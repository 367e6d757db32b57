"""Index throughput against the encoder alone and against the seed tutorial's loop, in one run.

(a) the encoder alone: forward passes only, on N images already decoded and in memory;
(b) the whole index job (`jobs.index.run`: read, decode, encode, caption, write, commit) on N
    stored JPEGs, after a warm-up index of 16 images has started Spark's Python workers and
    loaded their models (the cold run is shown too; its fixed cost is why N is large);
(c) the seed's loop: one image at a time, Keras load_img, VGG16 predict, one predict per word.
Same machine and settings: VGG16 at 224x224, random weights (no download here; speed does not
depend on the values). Also the bfloat16 encoder against float32: speed-up and the cosine of
their features. Peak memory is the summed RSS of this process, Spark's JVM and its workers
while (b) runs.

    .venv/bin/python -m bench.index [--images N]

Prints a table, then one JSON line: encoder_img_s, job_img_s, seed_loop_img_s, peak_rss_gb,
bf16_speedup, bf16_min_cosine, ...
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from PIL import Image

from cbir.lake import Lake
from cbir.settings import load_settings
from models.encoders import VGG16, bfloat16_supported, pixels


def make_photos(folder: Path, count: int, first: int = 0) -> None:
    """500x375 JPEGs, the size of a typical Flickr photo, each different."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(first)
    y, x = np.mgrid[0:375, 0:500]
    for i in range(first, first + count):
        base = np.stack([x * (1 + i % 3), y * 2 + i, x + y + 7 * i], -1) % 256
        image = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"{i:06d}.jpg", quality=85)


class PeakMemory(threading.Thread):
    """Summed resident memory of this process and all its descendants, sampled every 0.2 s."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = 0, threading.Event()

    def run(self):
        while not self.stop.wait(0.2):
            self.peak = max(self.peak, sum(rss(pid) for pid in _tree(os.getpid())))


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack += children.get(pid, [])
    return found


def rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def encoder_alone(images: np.ndarray, precision: str, batch: int) -> tuple[float, np.ndarray]:
    encoder = VGG16("random", precision)
    encoder.encode(images[:batch])  # trace once
    started = time.perf_counter()
    features = np.concatenate([encoder.encode(images[i : i + batch]) for i in range(0, len(images), batch)])
    return len(images) / (time.perf_counter() - started), features


def seed_loop(captioner, paths: list[Path]) -> float:
    """The tutorial: load_img at 224, VGG16 predict one image, then one predict per word."""
    import keras

    vgg = VGG16("random", "float32").model
    tokenizer, model, length = captioner.tokenizer, captioner.model, captioner.max_length
    started = time.perf_counter()
    for path in paths:
        image = keras.utils.img_to_array(keras.utils.load_img(path, target_size=(224, 224)))
        feature = vgg.predict(keras.applications.vgg16.preprocess_input(image[None]), verbose=0)
        words = [tokenizer.start]
        for _ in range(length):
            sequence = np.zeros((1, length), np.int32)
            sequence[0, : len(words)] = words
            words.append(int(model.predict([feature, sequence], verbose=0)[0, len(words) - 1].argmax()))
            if words[-1] == tokenizer.end:
                break
    return len(paths) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    args = parser.parse_args()
    from cbir.reader import resolve_source
    from jobs import index, ingest
    from jobs.job import run as run_job
    from jobs.spark import build_session
    from models import store

    n = args.images
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        overrides = [
            f"lake={tmp}/lake",
            f"state_dir={tmp}/state",
            "encoder.weights=random",
            "captioner.min_word_count=1",
            "train.epochs=1",
        ]
        settings = load_settings(overrides=overrides, environ={})
        make_photos(tmp / "photos", n)
        make_photos(tmp / "warmup", 16, first=10**6)

        # (b) the index job: a small captioner trained by `cbir train` in its own process (as a user
        # would; the index driver then holds no TensorFlow), ingest (not timed), warm up, index N.
        # Memory is measured over this part: the driver, Spark's JVM and its Python workers.
        with open(tmp / "captions.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["uri", "caption"])
            writer.writerows(
                (tmp / "warmup" / name, f"a photo number {i % 7}")
                for i, name in enumerate(sorted(os.listdir(tmp / "warmup")))
            )
        command = [str(Path(sys.executable).parent / "cbir"), "train", str(tmp / "captions.csv")]
        for item in overrides:
            command += ["--set", item]
        subprocess.run(command, check=True, capture_output=True, cwd=tmp)
        memory = PeakMemory()
        memory.start()
        spark = build_session(settings)
        lake = Lake.open(settings)
        make_photos(tmp / "warmup-index", 16, first=2 * 10**6)
        run_job(ingest.IngestJob(lake, settings, resolve_source(str(tmp / "warmup-index"), settings)), spark)
        warm = run_job(index.IndexJob(lake, settings), spark)
        run_job(ingest.IngestJob(lake, settings, resolve_source(str(tmp / "photos"), settings)), spark)
        job = run_job(index.IndexJob(lake, settings), spark)
        spark.stop()
        memory.stop.set()
        memory.join()

        # (a) the encoder alone on the same images, decoded beforehand; bfloat16 against float32.
        precision = VGG16("random", settings.encoder.precision).precision
        decoded = np.stack(
            [pixels((tmp / "photos" / name).read_bytes(), (224, 224)) for name in sorted(os.listdir(tmp / "photos"))]
        )
        encoder_img_s, _ = encoder_alone(decoded, precision, settings.encoder.batch_size)
        sample = decoded[: min(n, 64)]
        fp32_img_s, fp32 = encoder_alone(sample, "float32", settings.encoder.batch_size)
        bf16_img_s, bf16 = encoder_alone(sample, "bfloat16", settings.encoder.batch_size)
        cosine = (fp32 * bf16).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(bf16, axis=1)
        del decoded

        # (c) the seed's loop, on a few images: it is slow.
        captioner, _ = store.load(lake)
        loop_n = 8
        seed_img_s = seed_loop(captioner, sorted((tmp / "photos").iterdir())[:loop_n])

    job_img_s = job.indexed / job.seconds
    print(f"{'run':<46}{'images':>8}{'images/s':>10}")
    for name, count, rate in (
        (f"(a) encoder alone, {precision}, batch {settings.encoder.batch_size}", n, encoder_img_s),
        ("(b) index job, warm workers", job.indexed, job_img_s),
        ("    index job, cold workers (16 images)", warm.indexed, warm.indexed / warm.seconds),
        ("(c) seed loop: one image, one predict a word", loop_n, seed_img_s),
    ):
        print(f"{name:<46}{count:>8}{rate:>10.2f}")
    print(
        f"(b)/(a) = {job_img_s / encoder_img_s:.0%} (target >= 85%); (b)/(c) = {job_img_s / seed_img_s:.1f}x "
        f"(target >= 5x); peak memory {memory.peak / 2**30:.2f} GB (target < 6)"
    )
    print("index task seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in job.stages.items()))
    print(
        f"bfloat16 encoder: {bf16_img_s:.1f} images/s against float32 {fp32_img_s:.1f} "
        f"({bf16_img_s / fp32_img_s:.2f}x), min cosine {cosine.min():.6f}; native bfloat16 here: "
        f"{bfloat16_supported()}; encoder.precision=auto uses {precision}"
    )
    print(
        json.dumps(
            {
                "encoder_img_s": round(encoder_img_s, 2),
                "job_img_s": round(job_img_s, 2),
                "seed_loop_img_s": round(seed_img_s, 2),
                "job_vs_encoder": round(job_img_s / encoder_img_s, 3),
                "job_vs_seed_loop": round(job_img_s / seed_img_s, 1),
                "peak_rss_gb": round(memory.peak / 2**30, 2),
                "bf16_speedup": round(bf16_img_s / fp32_img_s, 2),
                "bf16_min_cosine": round(float(cosine.min()), 6),
                "precision": precision,
                "images": n,
                "cores": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
