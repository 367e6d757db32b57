"""The ingest flow under Prefect's test harness: it completes, leaves its artifacts, and keeps secrets out."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId

from cbir.lake import Lake
from flows.ingest import ingest_flow

from conftest import LIGHT_ENCODER, image_bytes, make_settings, task_runs


def test_ingest_flow_publishes_its_summary_and_never_its_secrets(prefect_server, spark, tmp_path):
    settings = make_settings(tmp_path, "s3.access_key=AKIAFLOWKEY", "s3.secret_key=flow-secret-value")
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(image_bytes(500 + i))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")

    state = ingest_flow(str(folder), settings=settings, return_state=True)

    assert state.is_completed()
    summary = state.result()
    assert (summary["found"], summary["ingested"], summary["failed"]) == (4, 3, {"not-an-image": 1})
    assert Lake.open(settings).table("manifest").read().num_rows == 4
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
        )
    by_key = {artifact.key: artifact for artifact in artifacts}
    table = by_key["ingest-summary"].data
    rows = json.loads(table) if isinstance(table, str) else table
    counts = {row["what"]: row["count"] for row in rows}
    assert counts["ingested"] == 3 and counts["failed: not-an-image"] == 1 and counts["found in source"] == 4
    assert by_key["ingest-progress"].data == 100.0
    stored = json.dumps(run.parameters, default=str) + json.dumps([a.model_dump(mode="json") for a in artifacts])
    assert "flow-secret-value" not in stored and "AKIAFLOWKEY" not in stored
    assert run.parameters["source"] == str(folder)
    # Its stages are tasks: the run's timeline shows each.
    assert task_runs(run.id) == {"list new items": "COMPLETED", "store images": "COMPLETED", "commit": "COMPLETED"}


SECRETS = [
    "s3.secret_key=s3-secret-value",
    "spark.conf.spark.authenticate.secret=spark-auth-secret",
    "spark.conf.spark.hadoop.fs.s3a.secret.key=s3a-secret-value",
]


def test_no_setting_is_a_parameter_prefect_records_for_a_run(prefect_server, tmp_path):
    """The settings (spark.conf's secrets among them) reach the flow, never the run's recorded parameters."""
    from flows.maintenance import maintenance_flow

    settings = make_settings(tmp_path, *SECRETS)
    state = maintenance_flow("vacuum", settings=settings, return_state=True)

    assert state.is_completed()
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    assert run.parameters == {"action": "vacuum", "table": None}
    assert "secret" not in json.dumps(run.parameters)


def test_every_flow_leaves_its_settings_out_of_what_prefect_records(tmp_path):
    import importlib
    import pkgutil

    from prefect import Flow

    import flows
    from flows.common import CbirFlow

    found = []
    for module in pkgutil.iter_modules(flows.__path__):
        for value in vars(importlib.import_module(f"flows.{module.name}")).values():
            if isinstance(value, Flow):
                found.append(value)
                assert isinstance(value, CbirFlow), f"{value.name} is not declared with flows.common.flow"
                assert isinstance(value.with_options(retries=1), CbirFlow)
    assert {f.name for f in found} >= {"ingest", "crawl-urls", "crawl-flickr", "index", "query", "train", "demo"}
    settings = make_settings(tmp_path, *SECRETS)
    assert ingest_flow.serialize_parameters({"source": "in", "settings": settings}) == {"source": "in"}


def test_train_flow_reports_epochs_and_bleu(prefect_server, spark, tmp_path):
    import csv

    from conftest import shapes_dataset

    settings = make_settings(
        tmp_path,
        *LIGHT_ENCODER,
        "captioner.units=32",
        "captioner.embedding_dim=16",
        "captioner.min_word_count=1",
        "train.epochs=3",
        "train.patience=3",
        "train.likeness_head=true",
    )
    with open(tmp_path / "shapes.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["uri", "caption", "split"])
        writer.writeheader()
        writer.writerows(shapes_dataset(tmp_path / "shapes", 18))
    from flows.train import train_flow

    state = train_flow(str(tmp_path / "shapes.csv"), settings=settings, return_state=True)

    assert state.is_completed()
    card = state.result()
    assert card["training"]["epochs_run"] == 3 and "greedy" in card["metrics"]
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    by_key = {artifact.key: artifact for artifact in artifacts}
    assert by_key["train-epochs-progress"].data == 100.0
    assert task_runs(state.state_details.flow_run_id) == {
        "read the data set": "COMPLETED",
        "features and fit": "COMPLETED",
        "save": "COMPLETED",
    }
    table = by_key["train-summary"].data
    rows = {row["what"]: row["value"] for row in (json.loads(table) if isinstance(table, str) else table)}
    assert rows["encoder"].startswith("efficientnet_lite0 (imagenet")
    likeness = card["likeness"]  # the learned likeness: every epoch measured, from the raw space (epoch 0) on
    assert len(likeness["history"]) == 21 and likeness["epochs_run"] == 20
    scores = likeness["map_at_10"]
    assert scores["raw"] == likeness["history"][0]["map_at_10"]
    assert scores["learned"] == max(epoch["map_at_10"] for epoch in likeness["history"]) >= scores["raw"]
    assert likeness["used"] == (likeness["best_epoch"] > 0)
    assert rows[f"likeness mAP@10 ({likeness['measured_on']}), raw -> learned"].startswith(
        f"{scores['raw']:.3f} -> {scores['learned']:.3f} ("
    )
    greedy, configured = card["metrics"]["greedy"], card["metrics"]["configured"]
    assert rows["BLEU-1..4, plain greedy"] == " ".join(f"{greedy[f'bleu{n}']:.3f}" for n in range(1, 5))
    assert rows["BLEU-1..4, beam (width 3)"] == " ".join(f"{configured[f'bleu{n}']:.3f}" for n in range(1, 5))
    assert rows["loops, beam (width 3)"] == "0% of captions"  # no word after itself, no bigram twice


@pytest.fixture(scope="module")
def shapes_lake(spark, tmp_path_factory):
    """A lake with a captioner trained on shapes and 24 more shapes ingested and indexed."""
    import csv

    from cbir.reader import resolve_source
    from jobs import index, ingest, train
    from jobs.job import run as run_job

    from conftest import shapes_dataset

    tmp = tmp_path_factory.mktemp("shapes-lake")
    settings = make_settings(
        tmp,
        *LIGHT_ENCODER,
        "captioner.units=64",
        "captioner.embedding_dim=32",
        "captioner.min_word_count=1",
        "captioner.dropout=0.2",
        "train.epochs=20",
        "train.batch_size=16",
        "train.patience=5",
    )
    with open(tmp / "train.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["uri", "caption", "split"])
        writer.writeheader()
        writer.writerows(shapes_dataset(tmp / "train", 72, seed=5))
    lake = Lake.open(settings)
    run_job(train.TrainJob(lake, settings, str(tmp / "train.csv")), spark)
    rows = shapes_dataset(tmp / "new", 24, seed=6)
    run_job(ingest.IngestJob(lake, settings, resolve_source(str(tmp / "new"), settings)), spark)
    run_job(index.IndexJob(lake, settings), spark)
    return settings, tmp, rows


def test_query_flow_writes_results_gallery_and_artifacts(prefect_server, spark, shapes_lake):
    from flows.query import query_flow
    from search.searcher import search_one

    settings, tmp, _ = shapes_lake
    # picture: an indexed image (its caption is reused); unseen: one the lake does not have (captioned now).
    (tmp / "queries.csv").write_text(
        f"query_id,text,image,k\nred,a red circle,,3\npicture,,{tmp}/new/0001.png,4\n"
        f"unseen,,{tmp}/train/0001.png,2\nbroken,,/no/such.png,\n"
    )

    with_likeness = settings.model_copy(update={"likeness": settings.likeness.model_copy(update={"image": True})})
    state = query_flow(str(tmp / "queries.csv"), settings=with_likeness, return_state=True)

    assert state.is_completed()
    summary = state.result()
    results, errors = Lake.open(settings).query_tables(summary["run_id"])
    rows = results.read().to_pylist()
    assert sorted({(r["query_id"], r["rank"]) for r in rows}) == [("picture", i) for i in range(1, 5)] + [
        ("red", i) for i in range(1, 4)
    ] + [("unseen", 1), ("unseen", 2)]
    indexed = {r["uri"]: r["caption"] for r in Lake.open(settings).table("captions").read().to_pylist()}
    assert {r["query_caption"] for r in rows if r["query_id"] == "picture"} == {indexed[f"{tmp}/new/0001.png"]}
    # Image queries blend BLEU with likeness to their own picture; the picture finds itself first.
    picture_id = next(
        r["image_id"]
        for r in Lake.open(settings).table("manifest").read().to_pylist()
        if r["uri"] == f"{tmp}/new/0001.png"
    )
    first = next(r for r in rows if r["query_id"] == "picture" and r["rank"] == 1)
    assert (first["image_id"], first["score"], first["likeness"]) == (  # 1 within float16 vectors' rounding
        picture_id,
        pytest.approx(1.0, abs=1e-4),
        pytest.approx(1.0, abs=1e-4),
    )
    assert all(r["likeness"] is not None for r in rows if r["query_id"] in ("picture", "unseen"))
    # A text query ranks by likeness to the picture it borrows: the same column says how alike.
    assert all(r["likeness"] is not None for r in rows if r["query_id"] == "red")
    assert all(r["query_caption"] for r in rows if r["query_id"] == "unseen")
    assert [(r["query_id"], r["reason"]) for r in errors.read().to_pylist()] == [("broken", "not-found")]
    page = Path(summary["gallery"]).read_text()
    assert page.count("<figure>") == 9 and "data:image/jpeg;base64," in page
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    by_key = {artifact.key: artifact for artifact in artifacts}
    assert by_key["query-gallery"].data.endswith(f"{summary['run_id']}/gallery.html)")
    table = by_key["query-results"].data
    assert len(json.loads(table) if isinstance(table, str) else table) == 8  # the top 3 (or k) of each query
    # The timeline: each stage is a task run of the flow run.
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    assert {run.name.rsplit("-", 1)[0] for run in tasks if run.state.is_completed()} == {
        "read the query file",
        "caption and search",
        "commit",
        "gallery",
    }

    _, hits, _ = search_one(Lake.open(settings), settings, 2, text="a red circle")
    assert [h["rank"] for h in hits] == [1, 2]
    assert hits[0]["score"] == max(r["score"] for r in rows if r["query_id"] == "red")


def test_eval_flow_measures_recall_and_map(prefect_server, spark, shapes_lake):
    import csv

    from flows.evaluate import eval_flow

    from conftest import COLOURS

    settings, tmp, rows = shapes_lake
    (tmp / "eval").mkdir()
    with open(tmp / "eval.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["uri", "caption", "category"])
        writer.writeheader()
        for row in rows[::5]:  # the first of each image's five captions; colour is the category
            colour = next(word for word in row["caption"].split() if word in COLOURS)
            # A copy: the eval ingests it (a duplicate of an indexed image) with its caption in the manifest.
            copy = tmp / "eval" / Path(row["uri"]).name
            copy.write_bytes(Path(row["uri"]).read_bytes())
            writer.writerow({"uri": str(copy), "caption": row["caption"], "category": colour})

    metrics = eval_flow(str(tmp / "eval.csv"), settings=settings)

    assert set(metrics) == {"r_at_1", "r_at_5", "r_at_10", "map_at_10", "queries", "image_r_at_10", "reachable"}
    assert metrics["queries"] == 24
    assert 0 <= metrics["r_at_1"] <= metrics["r_at_5"] <= metrics["r_at_10"] <= metrics["reachable"] <= 1
    # Measured: r@10 0.79 and mAP@10 0.33, above chance (10/24 = 0.42 and about 0.22: 5 of 23 others
    # share a colour): the small model's captions name colours often enough to find their kind.
    assert metrics["r_at_10"] > 0.5 and metrics["map_at_10"] > 0.25

    # The eval ingested eval.csv, so each image's manifest has the very caption asked ("given"), which would
    # answer every query by itself; eval searches only what cbir generated. Searching with it: all first.
    from cbir.references import KINDS
    from jobs.captions import lake_captions
    from jobs.search import search
    from models import store
    from search.queries import Query
    from search.searcher import Plan, Rules

    lake = Lake.open(settings)
    asked = [Query(f"t{i}", 1, text=row["caption"]) for i, row in enumerate(rows[::5])]
    assert {row["caption"] for row in lake.table("manifest").read().to_pylist()} >= {q.text for q in asked}
    with_given = lake_captions(spark, lake, store.card(lake)["version"])
    rules = dataclasses.replace(Rules.from_settings(settings), kinds=KINDS)
    found = search(spark, with_given, [Plan(q.query_id, q.words, q.k) for q in asked], rules).collect()
    assert all(hit["score"] == 1.0 for hit in found) and len(found) == 24
    assert metrics["r_at_1"] < 0.9


def test_the_query_job_cbir_search_and_cbir_web_find_the_same(spark, shapes_lake):
    """One searcher: the query job's Spark tasks, cbir search and cbir web rank alike and say why alike."""
    from jobs.captions import lake_captions
    from jobs.search import search
    from models import store
    from search.pictures import load_pictures
    from search.queries import Query
    from search.searcher import Rules, search_one
    from web.library import Library

    settings, _, _ = shapes_lake
    lake = Lake.open(settings)
    asked = [
        Query(f"q{i}", 6, text=text)
        for i, text in enumerate(["a red circle", "a blue square on a black background", "yellow triangle", "green"])
    ]
    version, rules = store.card(lake)["version"], Rules.from_settings(settings)
    captions = lake_captions(spark, lake, version)
    pictures = load_pictures(lake, version, rules.text_images, rules.params.max_order)
    assert pictures is not None  # text queries borrow pictures: every path must rank by them alike
    plans = [rules.plan(q.query_id, q.words, q.k, captions.rows, pictures) for q in asked]  # as the query job does
    assert all(plan.picture is not None for plan in plans[:3])
    rows = search(spark, captions, plans, rules, partitions=3).collect()
    web = Library(settings, lake)
    for q in asked:
        job = [
            (r["image_id"], r["score"], r["matched_kind"], r["matched_text"])
            for r in sorted((r for r in rows if r["query_id"] == q.query_id), key=lambda r: r["rank"])
        ]
        page = [(r.image_id, r.score, r.matched_kind, r.matched_text) for r in web.search(q.text, q.k).results]
        one = [
            (h["image_id"], h["score"], h["matched_kind"], h["matched_text"])
            for h in search_one(lake, settings, q.k, text=q.text)[1]
        ]
        assert job and job == page == one, q.text


def test_image_queries_with_the_blend_on_rank_alike_in_the_query_job_cbir_search_and_cbir_web(spark, shapes_lake):
    """likeness.image reaches every front door: an image query's BLEU pool re-ranked by likeness to its own
    picture, with identical hits in the query job's Spark tasks, cbir search and cbir web."""
    from jobs.captions import lake_captions
    from jobs.image_queries import caption_image_queries
    from jobs.search import search
    from models import store
    from search.pictures import load_pictures
    from search.queries import Query
    from search.searcher import Rules, search_one
    from web.library import Library

    settings, _, rows = shapes_lake
    with_likeness = settings.model_copy(update={"likeness": settings.likeness.model_copy(update={"image": True})})
    lake = Lake.open(with_likeness)
    card, rules = store.card(lake), Rules.from_settings(with_likeness)
    captions = lake_captions(spark, lake, card["version"])
    pictures = load_pictures(lake, card["version"], rules.text_images, rules.params.max_order)
    web = Library(with_likeness, lake)
    blended = 0
    for n, row in enumerate(rows[:4]):
        (query,), _ = caption_image_queries(spark, lake, with_likeness, [Query(f"i{n}", 6, image=row["uri"])], card)
        plan = rules.plan(query.query_id, query.words, query.k, captions.rows, pictures, query.vector)
        assert plan.picture is not None and plan.likeness.weight == with_likeness.likeness.image_weight
        found = sorted(search(spark, captions, [plan], rules, partitions=3).collect(), key=lambda r: r["rank"])
        job = [(r["image_id"], r["score"], r["matched_kind"], r["matched_text"]) for r in found]
        caption, hits, _ = search_one(lake, with_likeness, 6, image=row["uri"])
        one = [(h["image_id"], h["score"], h["matched_kind"], h["matched_text"]) for h in hits]
        with open(row["uri"], "rb") as image:
            answer = web.search_image(image.read(), 6)
        page = [(r.image_id, r.score, r.matched_kind, r.matched_text) for r in answer.results]
        assert caption == answer.caption == query.caption
        assert job and job == one == page, row["uri"]
        plain = [(h["image_id"], h["score"]) for h in search_one(lake, settings, 6, image=row["uri"])[1]]
        blended += plain != [hit[:2] for hit in one]
    assert blended  # the blend ranked them, not BLEU alone (likeness.image off)


def test_queries_with_examples_rank_alike_in_the_query_job_cbir_search_and_cbir_web(spark, shapes_lake):
    """Positive and negative example images reach every front door: a query file's columns (the query job,
    its examples as image ids and files), cbir search and the web; identical hits, each naming the positive
    it resembles, the negative never a result, and an unknown example an error row with the rest answered."""
    from jobs.job import run as run_job
    from jobs.query import QueryJob
    from search.searcher import search_one
    from web.library import Library

    settings, tmp, rows = shapes_lake
    lake = Lake.open(settings)
    captions = lake.table("captions").read().to_pylist()
    by_uri = {r["uri"]: r["image_id"] for r in captions}
    red, blue = (next(by_uri[r["uri"]] for r in rows if colour in r["caption"]) for colour in ("red", "blue"))
    asked = {
        "ids": ("a circle", [red], [blue]),
        "file": (None, [rows[2]["uri"]], []),
        "unknown": ("a circle", [red, "f" * 64], []),
        "not-an-image": ("a circle", [red, str(tmp / "notes.txt")], []),
    }
    (tmp / "notes.txt").write_text("just words")
    with open(tmp / "examples.jsonl", "w") as handle:
        for query_id, (text, positive, negative) in asked.items():
            row = {"query_id": query_id, "text": text, "positive": positive, "negative": negative, "k": 6}
            handle.write(json.dumps(row) + "\n")
    summary = run_job(QueryJob(lake, settings, str(tmp / "examples.jsonl")), spark)
    results, errors = lake.query_tables(summary.run_id)
    found = sorted(results.read().to_pylist(), key=lambda r: (r["query_id"], r["rank"]))
    failed = {e["query_id"]: e for e in errors.read().to_pylist()}
    assert {q: e["reason"] for q, e in failed.items()} == {"unknown": "not-found", "not-an-image": "not-an-image"}
    assert "positive example " + "f" * 64 in failed["unknown"]["error"]
    assert f"positive example {tmp / 'notes.txt'}" in failed["not-an-image"]["error"]
    web = Library(settings, lake)
    for query_id, (text, positive, negative) in asked.items():
        job = [(r["image_id"], r["score"], r["example"]) for r in found if r["query_id"] == query_id]
        _, hits, left_out = search_one(lake, settings, 6, text=text, like=tuple(positive), unlike=tuple(negative))
        one = [(h["image_id"], h["score"], h["example"]) for h in hits]
        assert job and job == one, query_id
        assert all(hit[2] for hit in job) and (blue not in [hit[0] for hit in job] or not negative)
        assert len(left_out) == (query_id in failed)
        if query_id in ("ids", "unknown"):  # the page and the API take image ids of the index
            page = web.search(text, 6, positive, negative)
            assert [(r.image_id, r.score, r.example) for r in page.results] == one
    assert found[0]["query_id"] == "file" and found[0]["image_id"] == by_uri[rows[2]["uri"]]  # finds itself first


def test_cbir_search_answers_without_spark_or_a_flow_run(shapes_lake):
    """cbir search (by text and by an indexed image) and the web app import no pyspark, and start no flow."""
    import os
    import subprocess
    import sys

    settings, tmp, _ = shapes_lake
    # A Prefect API that does not answer: a flow run would fail.
    environ = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("CBIR_", "PREFECT_"))},
        "PREFECT_API_URL": "http://127.0.0.1:9/api",
    }
    check = (
        "import sys; from cli.main import main; code = main(sys.argv[1:]); "
        "assert 'pyspark' not in sys.modules, 'pyspark was imported'; "
        "import web.app, search.index; assert 'pyspark' not in sys.modules, 'web imports pyspark'; "
        "sys.exit(code)"
    )
    common = [f"--set=lake={settings.lake}", f"--set=state_dir={settings.state_dir}"]
    common += [f"--set={item}" for item in LIGHT_ENCODER]
    for query in (["a red circle", "-k", "2"], ["--image", f"{tmp}/new/0001.png", "-k", "2"]):
        result = subprocess.run(
            [sys.executable, "-c", check, *common, "search", *query],
            capture_output=True,
            text=True,
            timeout=300,
            env=environ,
        )
        assert result.returncode == 0, result.stderr
        assert "top 2 for" in result.stdout and "Traceback" not in result.stderr
