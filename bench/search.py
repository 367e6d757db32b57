"""cbir search: one text query over N captions, the first time (builds and caches the index) and after.

1. N generated images with the default references each (bench/web.py's lake: bench/query.py's
   twelve texts an image, sha256-like image ids) are committed to a temporary lake as one captions run.
2. `cbir search "<query>"` runs as a subprocess three times, as a person runs it: cold (no cache:
   it builds the index from the lake and saves it under <state_dir>/search-index/), then warm twice
   (it memory-maps the saved index). Each time is the command's whole run, interpreter start included.
3. In this process, after them: loading the saved index (cache_load_s), and the baseline, building it
   from the lake as every cbir search did before the cache (build_s); the loaded index's answer to
   the query equals the built one's.

    .venv/bin/python -m bench.search [--captions N]

Prints a table, then one JSON line: captions, cold_s, warm_s (the faster warm run), warm_runs_s,
cache_load_s, build_s, index_bytes, same_results. Target: warm_s < 5 at 1,000,000 captions.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.query import corpus
from bench.web import VERSION, write_lake
from cbir.lake import Lake
from cbir.settings import load_settings
from cbir.text import words
from search.cache import FOLDER, cached_index
from search.index import Index, bleu_params, version_captions


def cbir_search(root: Path, text: str) -> tuple[float, str]:
    """(seconds, standard output) of one `cbir search` over the lake under root."""
    cbir = str(Path(sys.executable).parent / "cbir")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CBIR_")}
    command = [cbir, "search", text, "--set", f"lake={root}/lake", "--set", f"state_dir={root}/state"]
    started = time.perf_counter()
    done = subprocess.run(command, env=environ, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"cbir search failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=1_000_000)
    args = parser.parse_args()
    query = next(q for q in corpus(50, 20_000, seed=4) if len(q) >= 4)[:6]
    text = " ".join(query)

    with tempfile.TemporaryDirectory(prefix="cbir-bench-search-") as tmp:
        root = Path(tmp)
        clock = time.perf_counter()
        # In a child process: generating a million images' texts leaves this one's memory high for the
        # cbir search processes that come after.
        writer = multiprocessing.get_context("spawn").Process(target=write_lake, args=(root, args.captions))
        writer.start()
        writer.join()
        if writer.exitcode:
            raise SystemExit(f"writing the lake failed ({writer.exitcode})")
        write_s = time.perf_counter() - clock

        cold_s, cold_out = cbir_search(root, text)
        warm = [cbir_search(root, text) for _ in range(2)]
        same_output = all(out == cold_out for _, out in warm)
        (folder,) = [p for p in (root / "state" / FOLDER).iterdir() if not p.name.startswith(".")]
        index_bytes = sum(f.stat().st_size for f in folder.iterdir())

        settings = load_settings(overrides=[f"lake={root}/lake", f"state_dir={root}/state"], environ={})
        lake, params, kinds = Lake.open(settings), bleu_params(settings), tuple(settings.bleu.references)
        clock = time.perf_counter()
        loaded = cached_index(lake, settings.state_dir, VERSION, kinds, params.max_order)
        cache_load_s = time.perf_counter() - clock
        answer = loaded.search(words(text), 10, params)
        del loaded
        gc.collect()
        clock = time.perf_counter()
        built = Index.build(version_captions(lake, VERSION, kinds), kinds, params.max_order)
        build_s = time.perf_counter() - clock
        same_results = same_output and built.search(words(text), 10, params) == answer

    warm_runs = [seconds for seconds, _ in warm]
    print(f"{args.captions:,} captions, query \u201c{text}\u201d (k=10), {os.cpu_count()} cores")
    print(f"{'':<60}{'seconds':>10}")
    print(f"{'write the captions run (not counted)':<60}{write_s:>10.2f}")
    print(f"{'cbir search, cold: build the index from the lake and save it':<60}{cold_s:>10.2f}")
    for i, seconds in enumerate(warm_runs, start=1):
        print(f"{f'cbir search, warm #{i}: memory-map the saved index':<60}{seconds:>10.2f}")
    print(f"{'  in this process: load the saved index':<60}{cache_load_s:>10.2f}")
    print(f"{'  in this process: build it from the lake (the baseline)':<60}{build_s:>10.2f}")
    print(
        f"saved index {index_bytes / 2**20:,.0f} MiB; the warm answers equal the cold one and a fresh build's: "
        f"{same_results}"
    )
    print(
        json.dumps(
            {
                "captions": args.captions,
                "cold_s": round(cold_s, 2),
                "warm_s": round(min(warm_runs), 2),
                "warm_runs_s": [round(s, 2) for s in warm_runs],
                "cache_load_s": round(cache_load_s, 2),
                "build_s": round(build_s, 2),
                "index_bytes": index_bytes,
                "same_results": same_results,
            }
        )
    )


if __name__ == "__main__":
    main()
