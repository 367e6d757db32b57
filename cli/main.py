"""The cbir command: parse arguments, load settings, then run the verb's Prefect flow (ingest, crawl, train,
index, query, eval, demo, and lake optimize|vacuum) or do the verb's work in this process without a flow run:
search (the searcher), web (the app that holds one), info, cluster and lake history; ui runs the Prefect
server, and serve runs the flows' deployments on it.

Exit 0 when a run succeeds (bad items are rows, not failures), 2 on bad usage or settings,
1 when a run fails. Errors are one line on stderr; CBIR_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from cbir.errors import CbirError, UsageError
from cbir.lake import Lake
from cbir.samples import DEMO_EMOJI
from cbir.settings import MAX_K, Settings, load_settings, masked, override_variables
from cbir.text import printable
from cli import lake as lake_verb
from cli.flow_runs import run_flow

UI_PORT = 4200  # cbir ui's, and Prefect's, default


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # A verb may have a profile of its own (the demo runs offline) for when none is chosen.
        profile = args.profile or os.environ.get("CBIR_PROFILE") or getattr(args, "default_profile", None)
        settings = load_settings(profile, args.conf, [*args.set, *getattr(args, "set_after", [])])
        prepare_environment(settings)
        return args.command(args, settings) or 0
    except CbirError as exc:
        return _fail(exc, exc.exit_code)
    except KeyboardInterrupt:
        print("cbir: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a failed run: one line here, Prefect has logged the details
        return _fail(exc, 1, f"{type(exc).__name__}: ")


def _fail(exc: Exception, code: int, prefix: str = "") -> int:
    if os.environ.get("CBIR_DEBUG"):
        raise exc
    message = printable(str(exc).strip().splitlines()[0]) if str(exc).strip() else ""
    print(f"cbir: error: {prefix}{message}", file=sys.stderr)
    return code


def prepare_environment(settings: Settings) -> None:
    """Keep Prefect's and Keras' state in the project's state folder; must run before they are imported."""
    state = Path(settings.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(state / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("KERAS_HOME", str(state / "keras"))
    # TensorFlow's C++ log, in every Spark worker too: oneDNN says even notices at ERROR ("oneDNN supports
    # DT_BOOL only on platforms with AVX-512"); TensorFlow's failures reach us as Python exceptions.
    # models.quiet applies the level to the notices TensorFlow prints on import, before it reads it.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


# Verbs.
def info(args, settings: Settings) -> None:
    tables = Lake.open(settings).table_uris()
    if args.json:  # ensure_ascii: every control (and non-ASCII) character is a \u escape
        print(json.dumps({"settings": settings.public(), "tables": tables}, indent=2, ensure_ascii=True))
        return
    # Folder names come from the lake (features/<anything>): no control character reaches the terminal.
    lines = [f"profile: {settings.profile}", f"lake:    {settings.lake}", f"state:   {settings.state_dir}"]
    lines += [f"  {name:<9} {uri}" for name, uri in tables.items()]
    print("\n".join(printable(masked(line)) for line in lines))


def ingest(args, settings: Settings) -> None:
    from cbir.reader import resolve_source
    from flows.ingest import ingest_flow

    Lake.open(settings).check()
    resolve_source(args.source, settings)  # a missing source is bad usage: say so before starting a run
    run_flow(ingest_flow, source=args.source, retry_failed=args.retry_failed, settings=settings)


def crawl(args, settings: Settings) -> None:
    Lake.open(settings).check()
    if args.source == "urls":
        from cbir.reader import resolve_url_list
        from flows.crawl import crawl_urls_flow

        resolve_url_list(args.file, settings)
        run_flow(crawl_urls_flow, url_list=args.file, retry_failed=args.retry_failed, settings=settings)
        return
    from flows.crawl import crawl_flickr_flow
    from jobs.crawl.flickr import client

    search = _search(args)
    search.check()
    client(settings.flickr)  # no key: say so before starting a run
    if args.serve:
        from prefect import serve as serve_deployments

        from flows.serve import scheduled_crawl

        export_settings(args, settings)
        print(f"serving the scheduled crawl ({settings.crawl.schedule}); stop with Ctrl-C", file=sys.stderr)
        serve_deployments(scheduled_crawl(settings, search))
        return
    run_flow(crawl_flickr_flow, **vars(search), retry_failed=args.retry_failed, settings=settings)


def _search(args):
    from jobs.crawl.flickr import Search

    return Search(
        args.text,
        args.tags,
        args.tag_mode,
        args.license,
        args.min_taken,
        args.max_taken,
        args.bbox,
        args.sort,
        args.max,
    )


def train(args, settings: Settings) -> None:
    from cbir.reader import resolve_source
    from flows.train import train_flow

    Lake.open(settings).check()
    resolve_source(args.dataset, settings, columns=("uri", "caption"), what="data set")
    run_flow(train_flow, dataset=args.dataset, images=args.images, settings=settings)


def index(args, settings: Settings) -> None:
    from flows.index import index_flow

    Lake.open(settings).check()
    run_flow(index_flow, drop_version=args.drop_version, settings=settings)


def query(args, settings: Settings) -> None:
    from cbir.reader import resolve_source
    from flows.query import query_flow

    Lake.open(settings).check()
    resolve_source(args.file, settings, columns=("query_id",), what="query file")
    summary = run_flow(query_flow, query_file=args.file, captions=args.captions, settings=settings)
    print(summary["run_uri"])  # the last line of standard output: the run's folder


def search(args, settings: Settings) -> None:
    """One query, answered by the searcher in this process: no Spark session, no flow run."""
    from cbir.text import render_table
    from search.examples import check_examples
    from search.searcher import Rules, search_one

    if args.text is not None and args.image is not None:
        raise UsageError("search takes a text or --image PATH, not both")
    if args.image is not None and (args.like or args.unlike):
        raise UsageError("give the image as --like PATH, beside the other examples")
    if args.text is None and args.image is None and not args.like:
        raise UsageError("search needs a text, --image PATH or --like IMAGE")
    if args.k is not None and not 1 <= args.k <= MAX_K:
        raise UsageError(f"-k must be from 1 to {MAX_K}, got {args.k}")
    image = args.image and _local(args.image)
    like, unlike = (tuple(map(_example, names)) for names in (args.like, args.unlike))
    if args.text is not None:
        Rules.from_settings(settings).words(args.text)  # refused before the lake is opened
    check_examples(like, unlike, settings.query.max_examples, has_text=args.text is not None)
    lake = Lake.open(settings)
    lake.check()
    k = args.k or settings.query.k
    caption, hits, failures = search_one(lake, settings, k, text=args.text, image=image, like=like, unlike=unlike)
    for failure in failures:
        print(f"left out: {failure}", file=sys.stderr)
    if caption is not None:
        print(f"caption of the query image: {caption}")
    rows = [
        {
            "rank": h["rank"],
            "score": round(h["score"], 4),
            # An image found by likeness to the query's picture alone matched no text: as the page, show none.
            "matched": f"{h['matched_kind']}: {h['matched_text']}" if h["matched_text"] is not None else "",
            "caption": h["caption"],
            "uri": h["uri"] or "",
            **({"like": h["example"] or ""} if like else {}),
        }
        for h in hits
    ]
    asked = args.text or caption or f"{len(like)} example(s)"
    print(render_table(f"top {len(rows)} for \u201c{asked}\u201d", rows) if rows else "no results")


def _local(name: str) -> str:
    """A path as the searcher reads it (absolute), a URI as given."""
    return name if "://" in name else os.path.abspath(name)


def _example(name: str) -> str:
    """An example image: an image id of the lake, or a file (search.examples)."""
    from search.examples import is_image_id

    return name if is_image_id(name) else _local(name)


def duplicates(args, settings: Settings) -> None:
    """The groups of near-duplicate images of the captioner in use (search.duplicates on the captions' stored
    likeness vectors): a table, and with --out a gallery to review; in this process, no Spark, no flow run."""
    from cbir.text import render_table
    from models import store
    from search.duplicates import groups
    from search.gallery import duplicates_page
    from search.index import version_captions, visual_vectors

    if args.limit < 1:
        raise UsageError(f"--limit must be 1 or more, got {args.limit}")
    lake = Lake.open(settings)
    lake.check()
    version = store.resolve(lake, settings.captioner.version)
    table = version_captions(lake, version, ())
    vectors = visual_vectors(table)
    if vectors is None and table.num_rows:
        raise UsageError(
            f"the captions of captioner {version} have no likeness vectors: run `cbir index --drop-version {version}` "
            "and then `cbir index` (a captioner saved without a memory needs `cbir train` first)"
        )
    threshold = settings.duplicates.threshold
    found = _members(table, vectors, groups(table.column("image_id").to_pylist(), vectors, threshold))
    title = f"{len(found)} groups of near-duplicates among {table.num_rows} images (cosine >= {threshold}, {version})"
    rows = [
        {"group": n, "image_id": m["image_id"][:12], "uri": m["uri"] or "", "caption": m["caption"] or ""}
        for n, group in enumerate(found, start=1)
        for m in group
    ]
    print(
        render_table(title, rows)
        if rows
        else f"no near-duplicates among {table.num_rows} images (cosine >= {threshold})"
    )
    if args.out:
        page = duplicates_page(lake, settings, title, found, args.limit)
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "duplicates.html")
        with open(path, "w", encoding="utf-8") as file:
            file.write(page)
        print(f"gallery: {os.path.abspath(path)}")


def _members(table, vectors, found: list[list[str]]) -> list[list[dict]]:
    """Each group's images as image_id, uri, caption and cosine with the group's first."""
    row_of = {image_id: n for n, image_id in enumerate(table.column("image_id").to_pylist())}
    shown = table.select(["image_id", "uri", "caption"]).to_pylist()
    out = []
    for group in found:
        first = vectors[row_of[group[0]]].astype("float64")
        out.append([{**shown[row_of[i]], "cosine": float(vectors[row_of[i]].astype("float64") @ first)} for i in group])
    return out


def evaluate(args, settings: Settings) -> None:
    from cbir.reader import resolve_source
    from flows.evaluate import eval_flow

    Lake.open(settings).check()
    resolve_source(args.table, settings, columns=("uri", "caption"), what="evaluation table")
    metrics = run_flow(eval_flow, table=args.table, settings=settings)
    if args.json:
        print(json.dumps(metrics))


def demo(args, settings: Settings) -> None:
    from flows.demo import demo_flow

    if args.emoji < 0:
        raise UsageError(f"--emoji must be 0 or more, got {args.emoji}")
    Lake.open(settings).check()
    run_flow(demo_flow, emoji=args.emoji, settings=settings)


def ui(args, settings: Settings) -> int:
    url = f"http://{args.host}:{args.port}"
    print(f"Prefect UI at {url} (database in {os.environ['PREFECT_HOME']}).", file=sys.stderr)
    print(
        f"Runs of cbir commands from this folder appear there; from elsewhere, export PREFECT_API_URL={url}/api",
        file=sys.stderr,
    )
    command = [sys.executable, "-m", "cli.ui_server", "server", "start", "--host", args.host, "--port", str(args.port)]
    server = subprocess.Popen(command, env={**os.environ, **ui_environment(settings, args.host, args.port)})
    # Stopping cbir ui stops the server too (Ctrl-C reaches both; a kill reaches only this process).
    signal.signal(signal.SIGTERM, lambda *_: server.terminate())
    try:
        return max(server.wait(), 0)  # ended by a signal: the stop that was asked for
    except KeyboardInterrupt:
        return max(server.wait(), 0)


def ui_environment(settings: Settings, host: str, port: int) -> dict[str, str]:
    """The Prefect server's settings for cbir ui: only the UI's own origin (and ui.allowed_origins) may
    call the API from a browser, state-changing calls need a CSRF token (Prefect's clients fetch
    one), and only known Host names are served, so another site's page cannot list or run
    deployments on it."""
    # The page asks the API at this address; Prefect's default is port 4200 whatever --port says.
    browser_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    origins = [f"http://{browser_host}:{port}", *settings.ui.allowed_origins]
    if browser_host in ("127.0.0.1", "localhost"):
        origins.append(f"http://{'localhost' if browser_host == '127.0.0.1' else '127.0.0.1'}:{port}")
    hosts = {"127.0.0.1", "localhost", browser_host, *settings.ui.trusted_hosts}
    return {
        "PREFECT_UI_API_URL": f"http://{browser_host}:{port}/api",
        "_CBIR_UI_HOSTS": ",".join(sorted(hosts)),  # cli/ui_server.py: the Host names served
        "PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS": ",".join(origins),
        "PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED": str(settings.ui.csrf).lower(),
        "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED": "true",
    }


def serve(args, settings: Settings) -> None:
    from jobs.crawl.flickr import client

    search = _search(args) if (args.text or args.tags or args.bbox) else None
    if search is not None:
        search.check()
        client(settings.flickr)  # a scheduled crawl without a key would fail every night: say so now
    Lake.open(settings).check()
    api = os.environ.get("PREFECT_API_URL") or f"http://127.0.0.1:{UI_PORT}/api"
    try:
        with urllib.request.urlopen(f"{api.rstrip('/')}/health", timeout=10) as response:
            response.read()
    except (OSError, ValueError):
        raise UsageError(
            f"no Prefect server answers at {api}: start `cbir ui` first, or export PREFECT_API_URL"
        ) from None
    os.environ["PREFECT_API_URL"] = api
    export_settings(args, settings)
    from prefect import serve as serve_deployments

    from flows.serve import deployments

    served = deployments(settings, search)
    print(
        f"serving on {api}: crawl-flickr/scheduled-crawl ({settings.crawl.schedule}"
        f"{'' if search else ', paused until it has a search'}), index/scheduled-index ({settings.index.schedule}), "
        f"query/on-demand, lake-maintenance/scheduled-maintenance ({settings.maintenance.schedule}); stop with Ctrl-C",
        file=sys.stderr,
    )
    serve_deployments(*served)


def export_settings(args, settings: Settings) -> None:
    """Served runs load their settings from this process's environment: put this command's there too."""
    os.environ["CBIR_PROFILE"] = settings.profile
    if args.conf:
        os.environ["CBIR_CONF"] = os.path.abspath(args.conf)
    os.environ.update(override_variables([*args.set, *getattr(args, "set_after", [])]))
    os.environ["CBIR_LAKE"], os.environ["CBIR_STATE_DIR"] = settings.lake, settings.state_dir  # made absolute


def web(args, settings: Settings) -> None:
    from web.app import serve

    port = settings.web.port if args.port is None else args.port
    if not 1 <= port <= 65535:
        raise UsageError(f"--port must be from 1 to 65535, got {port}")
    Lake.open(settings).check()
    serve(settings, args.host or settings.web.host, port)


def cluster(args, settings: Settings) -> int:
    """A standalone Spark cluster on this machine (master and workers from the installed pyspark)."""
    from cbir import cluster as standalone

    folder = Path(settings.state_dir) / "cluster"
    running = standalone.Cluster.load(folder)
    if running and not running.alive_workers() and args.action != "stop":
        running = None  # stopped some other way: its state file is stale
    if args.action == "start":
        if running:
            raise UsageError(f"a cluster already runs at {running.url}; stop it first with `cbir cluster stop`")
        allow_remote = settings.spark.cluster_allow_remote
        if allow_remote and not standalone.is_loopback(args.host):
            print(f"cbir cluster: {standalone.exposure(args.host)}", file=sys.stderr)
        try:
            running = standalone.start(
                folder,
                args.workers,
                args.cores,
                args.memory,
                args.port,
                args.ui_port,
                args.host,
                pin=args.pin,
                allow_remote=allow_remote,
            )
        except ValueError as exc:  # a host that is not loopback, or too few CPUs to pin
            raise UsageError(str(exc)) from None
        print(f"web UI http://{running.host}:{running.ui_port}, logs in {folder}", file=sys.stderr)
        print(f"run cbir on it with --set spark.master={running.url} (or CBIR_SPARK__MASTER)", file=sys.stderr)
        print(running.url)
    elif args.action == "stop":
        stale = standalone.stop(running) if running else []
        if stale:  # a pid of the state file names no daemon of this cluster now: it was not signalled
            print(f"the state in {folder / standalone.STATE_FILE} was stale: {'; '.join(stale)}", file=sys.stderr)
        if running and len(stale) < len(running.daemons()):
            print(f"stopped {running.url}", file=sys.stderr)
        elif not running:
            print("no cluster to stop", file=sys.stderr)
    elif not running:
        print("no cluster runs (start one with `cbir cluster start`)", file=sys.stderr)
        return 1
    else:
        workers = running.state()["workers"]
        alive = [w for w in workers if w["state"] == "ALIVE"]
        print(json.dumps({"master": running.url, "workers": len(alive), "cores": sum(w["cores"] for w in alive)}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cbir", description="Caption-based reverse image search, as a batch pipeline."
    )
    _add_common(parser, after_verb=False)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, function, help: str) -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, help=help, description=help)
        _add_common(sub, after_verb=True)
        sub.set_defaults(command=function)
        return sub

    sub = verb("info", info, "print the active settings (secrets masked) and the lake's tables")
    sub.add_argument("--json", action="store_true", help="one JSON object: settings and tables")
    lake_verb.add_arguments(verb("lake", lake_verb.command, "the lake's Delta tables: history, optimize, vacuum"))
    sub = verb("ingest", ingest, "store the images of a folder, s3:// prefix or manifest file in the lake")
    sub.add_argument("source", help="folder, s3://bucket/prefix, image, or manifest (.csv .jsonl .parquet .txt)")
    sub.add_argument("--retry-failed", action="store_true", help="try again the items that failed before")
    sub = verb("crawl", crawl, "download images from a Flickr search or a list of URLs into the lake")
    sources = sub.add_subparsers(dest="source", required=True, metavar="SOURCE")
    flickr = sources.add_parser("flickr", help="search Flickr (photos.search) and download the photos")
    _add_search(flickr)
    flickr.add_argument("--serve", action="store_true", help="instead, serve this search on crawl.schedule")
    urls = sources.add_parser("urls", help="download the images of a list of URLs")
    urls.add_argument("file", help="CSV/JSONL/Parquet with uri (or url) and optional caption, title, tags; or text")
    for sub_source in (flickr, urls):
        sub_source.add_argument("--retry-failed", action="store_true", help="download again what failed before")
        _add_common(sub_source, after_verb=True)
    sub = verb("train", train, "train a captioner on a Flickr8k folder, a COCO captions JSON or a table")
    sub.add_argument("dataset", help="Flickr8k folder, COCO captions .json, or .csv/.jsonl/.parquet of uri, caption")
    sub.add_argument("--images", metavar="DIR", help="the image folder of a COCO captions file")
    sub = verb("index", index, "caption every new image of the manifest with the current captioner")
    sub.add_argument("--drop-version", metavar="V", help="instead, remove captioner version V's captions")
    sub = verb("query", query, "answer a file of text and image queries; prints the run folder last")
    sub.add_argument("file", help="CSV, JSONL or Parquet with query_id and text or image (and optional k)")
    sub.add_argument("--captions", metavar="TABLE", help="search this Parquet dataset (image_id, caption[, uri])")
    sub = verb("search", search, "one query by text or by example image, printed as a table")
    sub.add_argument("text", nargs="?", help="the words to search for")
    sub.add_argument("--image", metavar="PATH", help="search by this image's caption instead")
    sub.add_argument(
        "--like", action="append", default=[], metavar="IMAGE", help="more like this: an image file or an image id"
    )
    sub.add_argument("--unlike", action="append", default=[], metavar="IMAGE", help="less like this (as --like)")
    sub.add_argument("-k", type=int, help="how many results (default query.k)")
    sub = verb("duplicates", duplicates, "list the groups of near-duplicate images (settings duplicates.*)")
    sub.add_argument("--out", metavar="DIR", help="also write DIR/duplicates.html, a gallery of the groups to review")
    sub.add_argument("--limit", type=int, default=200, help="groups shown in the gallery (default 200)")
    sub = verb("eval", evaluate, "measure retrieval: recall@1/5/10 (text to image) and mAP@10 (image to image)")
    sub.add_argument("table", help="CSV, JSONL or Parquet with uri, caption and optional category")
    sub.add_argument("--json", action="store_true", help="end with one JSON line of the metrics")
    sub = verb(
        "demo",
        demo,
        "the whole pipeline on the sample corpus that pip installed: ingest, train, index, "
        "query, eval (profile: offline)",
    )
    sub.add_argument(
        "--emoji",
        type=int,
        default=DEMO_EMOJI,
        metavar="N",
        help=f"emoji in the corpus, besides the photos (default {DEMO_EMOJI})",
    )
    sub.set_defaults(default_profile="offline")
    sub = verb("ui", ui, "start the Prefect server and UI, its database in the state folder")
    sub.add_argument("--host", default="127.0.0.1")
    sub.add_argument("--port", type=int, default=UI_PORT)
    sub = verb("serve", serve, "serve the scheduled crawl and index and the on-demand query to the Prefect server")
    _add_search(sub, "the scheduled crawl's Flickr search (without one, the crawl deployment is paused): ")
    sub = verb("cluster", cluster, "start, stop or show a standalone Spark cluster on this machine")
    sub.add_argument("action", choices=["start", "stop", "status"])
    sub.add_argument("--workers", type=int, default=2, help="workers to start (default 2)")
    sub.add_argument("--cores", type=int, default=1, help="cores per worker (default 1)")
    sub.add_argument("--memory", default="2g", help="memory per worker for its executors (default 2g)")
    sub.add_argument("--pin", action="store_true", help="run each worker on CPUs of its own (--cores of them)")
    sub.add_argument(
        "--host",
        default="127.0.0.1",
        help="the address the daemons listen on: loopback, unless spark.cluster_allow_remote",
    )
    sub.add_argument("--port", type=int, default=7077, help="the master's port (default 7077)")
    sub.add_argument("--ui-port", type=int, default=8180, help="the master's web UI port (default 8180)")
    sub = verb("web", web, "serve the search page and its JSON API (default 127.0.0.1:8080, settings web.*)")
    sub.add_argument("--host", help="the address to listen on (default web.host)")
    sub.add_argument("--port", type=int, help="the port (default web.port)")
    return parser


def _add_search(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    parser.add_argument("--text", help=prefix + "free text, matched against titles, descriptions and tags")
    parser.add_argument("--tags", help="comma-separated tags")
    parser.add_argument("--tag-mode", default="any", help="any (default) or all of the tags")
    parser.add_argument("--license", help="comma-separated license ids, e.g. 4,5,9,10")
    parser.add_argument("--min-taken", metavar="DATE", help="taken on or after (YYYY-MM-DD)")
    parser.add_argument("--max-taken", metavar="DATE", help="taken on or before (YYYY-MM-DD)")
    parser.add_argument("--bbox", help="min_lon,min_lat,max_lon,max_lat")
    parser.add_argument("--sort", default="relevance", help="relevance, date-posted-desc, interestingness-desc, ...")
    parser.add_argument("--max", type=int, default=100, help="at most this many photos (default 100)")


def _add_common(parser: argparse.ArgumentParser, after_verb: bool) -> None:
    # After the verb, defaults are SUPPRESS so they never overwrite what came before it.
    default = argparse.SUPPRESS if after_verb else None
    parser.add_argument("--conf", metavar="FILE", default=default, help="a YAML settings file over the profile")
    parser.add_argument("--profile", metavar="NAME", default=default, help="local (default), s3, cluster or offline")
    parser.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        dest="set_after" if after_verb else "set",
        default=argparse.SUPPRESS if after_verb else [],
        help="override one setting",
    )


if __name__ == "__main__":
    sys.exit(main())
