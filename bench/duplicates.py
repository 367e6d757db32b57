"""Near-duplicate groups (search.duplicates, what `cbir duplicates` lists) against OpenClipart's known copies.

    .venv/bin/python -m bench.duplicates [--work DIR] [--captioner LAKE] [--versions V ...] [--distractors N]

Known copies. bench/data/openclipart.py drops a drawing as a copy of another when (1) its SVG or PNG is
a symlink to the other's file (Debian's dedup of identical files) or (2) it has the same file name and
the same cleaned title in another folder (the road signs in signs_and_symbols/ and transportation/).
Those two relations, joined transitively, are the loader's copy groups. Rule (2) also joins different
pictures that share a name (the Lemon theme's "exec" in actions/, filesystems/ and mimetypes/ are three
icons), so a pair of files of one loader group is a known copy only when their pictures match: each
composited on white, its blank border trimmed, scaled to 32 x 32 RGB, they differ by at most
COPY_RMS (root mean square, on 0..1). Such a pair with identical bytes is one image in the lake (its id is
the bytes' sha256), which `cbir index` merges already: the baseline. The pairs whose bytes differ (the
same drawing exported at another size or by another tool) are what likeness must find.

The lake: every distinct file of the loader's copy groups (those with two or more files), and N other
drawings of the corpus drawn with a seed (distractors), each ingested once and indexed by a captioner
trained on OpenClipart (bench.quality's train rows and default recipe; --captioner takes one already
trained in another lake, e.g. a bench.quality --work folder, instead). Then, for each threshold, the
groups of search.duplicates.groups on the stored likeness vectors, as pairs of images:
  recall           known copies with different bytes found (both in one group)
  precision        found pairs whose pictures match (COPY_RMS), over found pairs: a known copy, or a copy
                   the loader does not know (OpenClipart has hundreds: the gramastar stars of 73 and 82
                   points are one disc at 32 x 32); only a pair of pictures that differ is wrong
  precision_known  found pairs that are known copies, over found pairs: the copies the loader does not
                   know count against it
  files_recall     over every known copy pair of files, the identical ones included (baseline: exact bytes)
The baseline row is the lake today: exact bytes only (no pair of distinct images is found).
Prints a table, the known copy groups and the wrong pairs at the chosen threshold, then one JSON line:
{"threshold": T, "precision": .., "recall": .., "files_recall": .., "sweep": {T: {...}}, "baseline": {...}}.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from PIL import Image, ImageChops

from cbir.lake import Lake
from cbir.samples import write_jsonl
from cbir.settings import load_settings

COPY_RMS = 0.05  # the same picture: trimmed and scaled to 32 x 32, at most this RMS difference
SIGNATURE = (32, 32)
THRESHOLDS = (0.9, 0.95, 0.98, 0.99, 0.993, 0.995, 0.997, 0.999)
DISTRACTORS, SEED = 600, 0


# The known copies.
def loader_groups(drawings: list) -> list[list]:
    """The loader's copy groups of two or more drawings: one PNG file (a symlink), or one (file name, cleaned
    title), joined transitively (bench.data.openclipart.build drops all but one of each)."""
    from bench.data.openclipart import clean

    parent = list(range(len(drawings)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict = {}
    for i, drawing in enumerate(drawings):
        for key in (os.path.realpath(drawing.png), (drawing.rel.rsplit("/", 1)[-1], clean(drawing.title))):
            j = first.setdefault(key, i)
            parent[root(i)] = root(j)
    members: dict[int, list] = defaultdict(list)
    for i, drawing in enumerate(drawings):
        members[root(i)].append(drawing)
    return [group for group in members.values() if len(group) > 1]


def signature(path: str) -> np.ndarray:
    """The picture composited on white, its blank border trimmed, as 32 x 32 RGB in 0..1."""
    with Image.open(path) as image:
        rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, "white")
    white.alpha_composite(rgba)
    rgb = white.convert("RGB")
    box = ImageChops.difference(rgb, Image.new("RGB", rgb.size, "white")).convert("L").point(lambda v: 255 * (v > 8))
    bbox = box.getbbox()
    if bbox:
        rgb = rgb.crop(bbox)
    return np.asarray(rgb.resize(SIGNATURE, Image.BILINEAR), np.float32).ravel() / 255


def sha256(path: str) -> str:
    with open(path, "rb") as file:
        return hashlib.sha256(file.read()).hexdigest()


def same_picture(signatures: np.ndarray) -> np.ndarray:
    """(n, n) bool: pairs of signatures at most COPY_RMS apart."""
    sq = (signatures**2).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * signatures @ signatures.T, 0) / signatures.shape[1]
    return np.sqrt(d2) <= COPY_RMS


def corpus_files(distractors: int) -> tuple[dict[str, str], list[list[str]], dict]:
    """(image id -> one file of those bytes, the loader's groups as lists of files' image ids, stats)."""
    from bench.data.openclipart import default_cache, fetch, scan

    drawings, _, _ = scan(fetch(default_cache()))
    groups = loader_groups(drawings)
    in_groups = {id(d) for group in groups for d in group}
    others = [d for d in drawings if id(d) not in in_groups]
    random.Random(SEED).shuffle(others)
    files = [str(d.png) for group in groups for d in group] + [str(d.png) for d in others[:distractors]]
    with ThreadPoolExecutor(4) as pool:
        ids = dict(zip(files, pool.map(sha256, files)))
    first: dict[str, str] = {}
    for path in files:
        first.setdefault(ids[path], path)
    id_groups = [[ids[str(d.png)] for d in group] for group in groups]
    stats = {"drawings": len(drawings), "loader_groups": len(groups), "group_files": sum(map(len, groups))}
    return first, id_groups, stats


# The lake.
def build_lake(work: Path, images: dict[str, str], captioner: str | None, quick: bool, overrides: list[str]):
    """The settings of a lake in work/ with a captioner (trained, or copied) and `images` ingested (again: no-op)."""
    from flows.ingest import ingest_flow

    settings = load_settings(
        "offline", overrides=[f"lake={work / 'lake'}", f"state_dir={work / 'state'}", *overrides], environ={}
    )
    Lake.open(settings).check()
    if not (work / "lake" / "models" / "captioner" / "current").exists():  # a rerun keeps what is there
        if captioner:
            shutil.copytree(Path(captioner) / "models" / "captioner", work / "lake" / "models" / "captioner")
        else:
            train(work, settings, quick)
    source = write_jsonl([{"uri": uri} for uri in sorted(images.values())], work / "images.jsonl")
    ingest_flow(str(source), settings=settings)
    return settings


def train(work: Path, settings, quick: bool) -> None:
    """A captioner as bench.quality's default recipe trains one on OpenClipart's train and dev rows."""
    from bench.quality import corpus_rows, training_rows
    from flows.train import train_flow

    rows = [row for row in corpus_rows("openclipart", quick) if row["split"] != "test"]
    dataset = write_jsonl(training_rows(rows, "caption"), work / "train.jsonl")
    train_flow(dataset=str(dataset), settings=settings)


def vectors_of(settings, version: str) -> tuple[list[str], np.ndarray]:
    """Index the lake with captioner `version`; its images' ids and stored likeness vectors."""
    from flows.index import index_flow
    from models import store
    from search.index import version_captions, visual_vectors

    settings = settings.model_copy(update={"captioner": settings.captioner.model_copy(update={"version": version})})
    index_flow(settings=settings)
    lake = Lake.open(settings)
    table = version_captions(lake, store.resolve(lake, version), ())
    vectors = visual_vectors(table)
    if vectors is None:
        sys.exit(f"captioner {version} stored no likeness vectors")
    return table.column("image_id").to_pylist(), vectors


# The measure.
def truth(ids: list[str], images: dict[str, str], id_groups: list[list[str]]) -> tuple[set, set, dict]:
    """(known copy pairs of distinct images, pairs of images whose pictures match, signatures' stats)."""
    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        signatures = np.stack(list(pool.map(signature, [images[i] for i in ids])))
    same = same_picture(signatures)
    row = {image_id: n for n, image_id in enumerate(ids)}
    known = set()
    for group in id_groups:
        present = sorted({i for i in group if i in row})
        known |= {(a, b) for n, a in enumerate(present) for b in present[n + 1 :] if same[row[a], row[b]]}
    i, j = np.nonzero(np.triu(same, 1))
    matching = {tuple(sorted((ids[a], ids[b]))) for a, b in zip(i.tolist(), j.tolist())}
    return known, matching, {"signatures_s": time.monotonic() - started}


def file_pairs(id_groups: list[list[str]], known: set, indexed: set) -> list[tuple[str, str]]:
    """Every known copy pair of files (as their images' ids, equal for identical bytes), indexed images only."""
    out = []
    for group in id_groups:
        files = [i for i in group if i in indexed]
        out += [(a, b) for n, a in enumerate(files) for b in files[n + 1 :] if a == b or tuple(sorted((a, b))) in known]
    return out


def score(found: list[list[str]], known: set, matching: set, files: list[tuple[str, str]]) -> dict:
    group_of = {image_id: n for n, group in enumerate(found) for image_id in group}
    pairs = {tuple(sorted((a, b))) for group in found for n, a in enumerate(group) for b in group[n + 1 :]}
    right, unknown = len(pairs & known), len((pairs - known) & matching)
    wrong = len(pairs) - right - unknown
    together = sum(1 for a, b in files if a == b or group_of.get(a, -1) == group_of.get(b, -2))
    return {
        "pairs": len(pairs),
        "known_found": right,
        "unknown_copies": unknown,
        "wrong": wrong,
        "precision": (right + unknown) / len(pairs) if pairs else 1.0,
        "precision_known": right / len(pairs) if pairs else 1.0,
        "recall": right / max(len(known), 1),
        "files_recall": together / max(len(files), 1),
        "groups": len(found),
    }


def report(rows: dict[str, dict]) -> None:
    columns = ("groups", "pairs", "known_found", "unknown_copies", "wrong", "precision", "precision_known")
    columns += ("recall", "files_recall")
    print(f"{'threshold':<12}" + "".join(f"{c:>16}" for c in columns))
    for name, row in rows.items():
        print(
            f"{name:<12}"
            + "".join(f"{row[c]:>16.3f}" if isinstance(row[c], float) else f"{row[c]:>16}" for c in columns)
        )


def explain(found: list[list[str]], known: set, matching: set, images: dict[str, str], limit: int = 12) -> None:
    """The known copies missed and the wrong pairs, with their files, for a person to check."""
    together = {tuple(sorted((a, b))) for group in found for n, a in enumerate(group) for b in group[n + 1 :]}
    missed, wrong = sorted(known - together), sorted(together - known - matching)
    for title, pairs in (("known copies missed", missed), ("wrong pairs", wrong)):
        print(f"{title}: {len(pairs)}")
        for a, b in pairs[:limit]:
            print(f"    {_short(images[a])}  ~  {_short(images[b])}")


def _short(path: str) -> str:
    return path.split("/png/", 1)[-1]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.duplicates", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--work", metavar="DIR", help="keep the lake here; an existing one is reused (default: temporary)"
    )
    parser.add_argument("--captioner", metavar="LAKE", help="copy this local lake's captioners instead of training one")
    parser.add_argument("--versions", nargs="+", default=["current"], help="captioner versions to measure")
    parser.add_argument("--distractors", type=int, default=DISTRACTORS, help=f"other drawings (default {DISTRACTORS})")
    parser.add_argument("--quick", action="store_true", help="train on a quarter of the corpus (bench.quality --quick)")
    parser.add_argument(
        "--default", type=float, default=None, help="the threshold to report (default duplicates.threshold)"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="cbir-duplicates-") as tmp:
        work = Path(args.work or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        from cli.main import prepare_environment

        base = load_settings("offline", overrides=[f"state_dir={work / 'state'}", f"lake={work / 'lake'}"], environ={})
        prepare_environment(base)
        images, id_groups, stats = corpus_files(args.distractors)
        print(
            f"{stats['drawings']} drawings; the loader's copy groups: {stats['loader_groups']}, "
            f"of {stats['group_files']} files"
        )
        print(f"lake: {len(images)} distinct images ({args.distractors} distractors) in {work}", flush=True)
        from jobs.spark import build_session

        spark = build_session(base)
        try:
            with open(work / "flows.log", "a") as log, contextlib.redirect_stdout(log):
                settings = build_lake(work, images, args.captioner, args.quick, [])
                measured = {version: vectors_of(settings, version) for version in args.versions}
        finally:
            spark.stop()
        threshold = args.default if args.default is not None else base.duplicates.threshold
        out = {}
        for version, (ids, vectors) in measured.items():
            out[version] = measure(ids, vectors, images, id_groups, threshold)
    print(json.dumps(out[args.versions[0]] if len(out) == 1 else out))


def measure(
    ids: list[str], vectors: np.ndarray, images: dict[str, str], id_groups: list[list[str]], threshold: float
) -> dict:
    from search.duplicates import groups

    known, matching, _ = truth(ids, images, id_groups)
    files = file_pairs(id_groups, known, set(ids))
    print(
        f"\n{len(ids)} images indexed; known copies: {len(known)} pairs of distinct images, {len(files)} pairs of files"
    )
    rows = {"baseline": score([], known, matching, files)}
    timings = {}
    for t in sorted({*THRESHOLDS, threshold}):
        started = time.monotonic()
        rows[f"{t:g}"] = score(groups(ids, vectors, t), known, matching, files)
        timings[t] = time.monotonic() - started
    report(rows)
    print(f"groups() on {len(ids)} images: {max(timings.values()):.2f} s at most")
    print(f"\nat {threshold:g}:")
    explain(groups(ids, vectors, threshold), known, matching, images)
    chosen = rows[f"{threshold:g}"]
    keys = ("precision", "precision_known", "recall", "files_recall")
    return {
        "threshold": threshold,
        **{k: round(chosen[k], 4) for k in keys},
        "known_pairs": len(known),
        "sweep": {name: {k: round(row[k], 4) for k in keys} for name, row in rows.items() if name != "baseline"},
        "baseline": {k: round(rows["baseline"][k], 4) for k in keys},
    }


if __name__ == "__main__":
    main()
