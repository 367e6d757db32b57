"""The ingest flow under Prefect's test harness: it completes, leaves its artifacts, and keeps secrets out."""

from __future__ import annotations

import json

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.testing.utilities import prefect_test_harness

from cbir.lake import Lake
from conftest import image_bytes, make_settings
from flows.ingest import ingest_flow


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


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
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    by_key = {artifact.key: artifact for artifact in artifacts}
    table = by_key["ingest-summary"].data
    rows = json.loads(table) if isinstance(table, str) else table
    counts = {row["what"]: row["count"] for row in rows}
    assert counts["ingested"] == 3 and counts["failed: not-an-image"] == 1 and counts["found in source"] == 4
    assert by_key["ingest-progress"].data == 100.0
    stored = json.dumps(run.parameters, default=str) + json.dumps([a.model_dump(mode="json") for a in artifacts])
    assert "flow-secret-value" not in stored and "AKIAFLOWKEY" not in stored
    assert run.parameters["source"] == str(folder)


def test_train_flow_reports_epochs_and_bleu(prefect_server, spark, tmp_path):
    import csv

    from conftest import shapes_dataset

    settings = make_settings(tmp_path, "encoder.weights=random", "captioner.units=32", "captioner.embedding_dim=16",
                             "captioner.min_word_count=1", "train.epochs=3", "train.patience=3")
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
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    by_key = {artifact.key: artifact for artifact in artifacts}
    assert by_key["train-epochs-progress"].data == 100.0
    table = by_key["train-summary"].data
    rows = {row["what"]: row["value"] for row in (json.loads(table) if isinstance(table, str) else table)}
    assert rows["encoder"].startswith("vgg16 (random (tests only")
    greedy = card["metrics"]["greedy"]
    assert rows["BLEU-1..4 greedy"] == " ".join(f"{greedy[f'bleu{n}']:.3f}" for n in range(1, 5))
