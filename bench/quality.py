"""Caption and retrieval quality of two encoders on the sample corpus that pip installs.

The corpus is cbir.samples.sample_corpus(): the scikit-image photos and Twemoji's emoji, each
with its caption and category. A fixed held-out split (20% of every category, seeded) is the
test set; 10% of every category is dev (the best dev epoch's weights are kept), the rest trains.
For each encoder, in its own temporary lake, with the same captioner settings and budget:

    train flow (`cbir train train.jsonl`)         the captioner, on the train and dev rows only
    eval flow (`cbir eval heldout.jsonl --json`)  ingest and index the held-out images, then
                                                  recall@1/5/10 (each ground-truth caption as a
                                                  query) and mAP@10 (by category)

then corpus BLEU-1..4 (nltk corpus_bleu) of the captions the index wrote for the held-out
images, against their ground-truth captions. The encoders: (a) VGG16 with random weights (what
tests use; its features carry no learned meaning), (b) EfficientNet-Lite0 with the ImageNet
weights its pip package ships. The flows run in this process, so Prefect's temporary server and
Spark start once; their output goes to <work>/<encoder>/flows.log.

    .venv/bin/python bench/quality.py            # all 1,382 images, 20 epochs: about 10 minutes on 2 cores
    .venv/bin/python bench/quality.py --quick    # the photos and 72 emoji, batches of 16: about 3 minutes

Prints a table, then one JSON line: {"vgg16_random": {bleu1..bleu4, r_at_1, r_at_5, r_at_10,
map_at_10}, "efficientnet_lite0": {...}}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cbir.lake import Lake  # noqa: E402
from cbir.samples import sample_corpus, write_jsonl  # noqa: E402
from cbir.settings import load_settings  # noqa: E402

ENCODERS = {  # the JSON key -> encoder settings
    "vgg16_random": ("vgg16", "random"),
    "efficientnet_lite0": ("efficientnet_lite0", "imagenet"),
}
METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "r_at_1", "r_at_5", "r_at_10", "map_at_10")
TEST_FRACTION, DEV_FRACTION, SEED = 0.2, 0.1, 0
QUICK_EMOJI = 72  # 8 of each emoji group (5 flags)


def held_out_split(rows: list[dict], seed: int = SEED) -> list[dict]:
    """Each row with a split: in every category, a seeded TEST_FRACTION is test and DEV_FRACTION dev.

    A category of two or more rows gives at least one to test; dev only takes from what is left
    beyond one training row."""
    by_category: dict[str, list[dict]] = {}
    for row in sorted(rows, key=lambda row: row["uri"]):
        by_category.setdefault(row.get("category") or "", []).append(row)
    rng = random.Random(seed)
    out = []
    for category in sorted(by_category):
        members = by_category[category]
        rng.shuffle(members)
        n = len(members)
        test = max(1, round(n * TEST_FRACTION)) if n >= 2 else 0
        dev = min(round(n * DEV_FRACTION), max(0, n - test - 1))
        for i, row in enumerate(members):
            out.append({**row, "split": "test" if i < test else "dev" if i < test + dev else "train"})
    return out


def measure(key: str, work: Path, state: Path, train: Path, heldout: Path, budget: list[str]) -> dict:
    """Train on train.jsonl, eval on heldout.jsonl, BLEU of the held-out captions: one encoder, its own lake."""
    from flows.evaluate import eval_flow
    from flows.train import train_flow
    from models.training import corpus_bleu

    name, weights = ENCODERS[key]
    folder = work / key
    folder.mkdir()
    overrides = [f"lake={folder / 'lake'}", f"state_dir={state}", f"encoder.name={name}",
                 f"encoder.weights={weights}", *budget]
    settings = load_settings(overrides=overrides, environ={})
    with open(folder / "flows.log", "w") as log, contextlib.redirect_stdout(log):
        started = time.monotonic()
        card = train_flow(dataset=str(train), settings=settings)
        trained = time.monotonic()
        retrieval = eval_flow(table=str(heldout), settings=settings)
        evaluated = time.monotonic()

    lake = Lake.open(settings)
    captions = lake.table("captions").read(["uri", "caption", "model_version", "status"]).to_pylist()
    generated = {row["uri"]: row["caption"] for row in captions
                 if row["model_version"] == card["version"] and row["status"] == "ok"}
    rows = [row for row in read_jsonl(heldout) if row["uri"] in generated]
    bleu = corpus_bleu([[row["caption"]] for row in rows], [generated[row["uri"]] for row in rows])
    return {**bleu, **{k: retrieval[k] for k in ("r_at_1", "r_at_5", "r_at_10", "map_at_10")},
            "captioned": len(rows), "queries": retrieval["queries"], "epochs": card["training"]["epochs_run"],
            "vocabulary": card["sizes"]["vocabulary"], "train_s": trained - started, "eval_s": evaluated - trained}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"the photos and {QUICK_EMOJI} emoji, batches of 16: a smoke run of a few minutes")
    parser.add_argument("--emoji", type=int, help=f"emoji in the corpus (default: all of them; --quick: {QUICK_EMOJI})")
    parser.add_argument("--epochs", type=int, default=20, help="epochs, the same for both encoders (default 20)")
    parser.add_argument("--work", metavar="DIR", help="keep the lakes and logs here (default: a temporary folder)")
    args = parser.parse_args()
    emoji = args.emoji if args.emoji is not None else QUICK_EMOJI if args.quick else None
    epochs = args.epochs
    # The same budget for both encoders: every epoch runs (patience = epochs), and the weights of the
    # epoch with the best dev loss are kept. On the quick corpus one batch of 64 would be an epoch.
    batch_size = 16 if args.quick else 64
    budget = [f"train.epochs={epochs}", f"train.patience={epochs}", f"train.batch_size={batch_size}",
              f"train.seed={SEED}"]

    with tempfile.TemporaryDirectory(prefix="cbir-quality-") as tmp:
        work = Path(args.work or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        if any(work.iterdir()):
            sys.exit(f"--work {work} is not empty")
        state = work / "state"  # shared: EfficientNet-Lite0's converted weights are cached once
        rows = held_out_split(sample_corpus(emoji=emoji))
        train = write_jsonl([row for row in rows if row["split"] != "test"], work / "train.jsonl")
        heldout = write_jsonl([row for row in rows if row["split"] == "test"], work / "heldout.jsonl")
        counts = {split: sum(1 for row in rows if row["split"] == split) for split in ("train", "dev", "test")}
        categories = len({row["category"] for row in rows})
        print(f"corpus: {len(rows)} images in {categories} categories; train {counts['train']}, "
              f"dev {counts['dev']}, held out {counts['test']}; {epochs} epochs each")
        from flows.cli import prepare_environment

        base = load_settings(overrides=[f"state_dir={state}", f"lake={work / 'lake'}"], environ={})
        prepare_environment(base)  # Prefect's and Keras' state in the work folder, before they are imported
        from jobs.spark import build_session

        spark = build_session(base)  # every flow below reuses this session
        results = {}
        try:
            for key in ENCODERS:
                print(f"{key}: training and evaluating (log: {work / key / 'flows.log'}) ...", flush=True)
                results[key] = measure(key, work, state, train, heldout, budget)
        finally:
            spark.stop()

    print(f"\n{'metric':<22}" + "".join(f"{key:>20}" for key in results))
    for metric in (*METRICS, "captioned", "queries", "vocabulary", "epochs", "train_s", "eval_s"):
        cells = [results[key][metric] for key in results]
        print(f"{metric:<22}" + "".join(f"{v:>20.1f}" if metric.endswith("_s") else f"{v:>20.4f}"
                                        if isinstance(v, float) else f"{v:>20}" for v in cells))
    print(json.dumps({key: {metric: round(result[metric], 4) for metric in METRICS}
                      for key, result in results.items()}))


if __name__ == "__main__":
    main()
