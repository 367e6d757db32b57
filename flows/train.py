"""Train flow: a captioned data set -> cached features -> an LSTM captioner, evaluated and versioned."""

from __future__ import annotations

from cbir.settings import Settings
from flows.common import flow, open_lake, run_job
from flows.reporting import Progress, publish_summary
from jobs import train
from models.card import ModelCard


@flow(name="train", log_prints=True)
def train_flow(dataset: str, images: str | None = None, settings: Settings | None = None) -> dict:
    """Train a captioner on DATASET, report BLEU on its test split, and make it the current version."""
    settings, lake = open_lake(settings)
    if settings.encoder.weights == "random":
        print("encoder.weights=random: features carry no learned meaning; use this model for tests only")
    epochs = Progress("train-epochs-progress", "training", unit="epochs", announce=False)

    def on_epoch(epoch: int, logs: dict) -> None:
        epochs(epoch, settings.train.epochs)
        print(f"epoch {epoch}/{settings.train.epochs}: " + ", ".join(f"{k} {v:.4f}" for k, v in logs.items()))

    card = run_job(train.TrainJob(lake, settings, dataset, images, on_epoch), settings)
    epochs.finish()
    publish_summary("train-summary", f"captioner {card.version} (now current)", summary_rows(card))
    return card.as_dict()


def summary_rows(card: ModelCard) -> list[dict]:
    data, metrics, encoder = card.dataset, card.metrics, card.encoder
    rows = [
        {"what": "encoder", "value": f"{encoder.name} ({encoder.weights})"},
        {"what": "encoder weights", "value": encoder.weights_source or encoder.weights},
        {"what": "captions train/dev/test", "value": "/".join(str(data.captions[s]) for s in ("train", "dev", "test"))},
        {"what": "images train/dev/test", "value": "/".join(str(data.images[s]) for s in ("train", "dev", "test"))},
        {"what": "rows skipped", "value": ", ".join(f"{k} {v}" for k, v in data.skipped.items()) or "none"},
        {"what": "vocabulary", "value": str(card.sizes.vocabulary)},
        {"what": "epochs (best)", "value": f"{card.training.epochs_run} ({card.training.best_epoch})"},
    ]
    decoding = metrics.decoding
    configured = f"{decoding.get('method')}" + (
        f" (width {decoding.get('beam_width')})" if decoding.get("method") == "beam" else ""
    )
    for scores, label in ((metrics.greedy, "plain greedy"), (metrics.configured, configured)):
        if scores is not None:
            bleu = " ".join(f"{scores[f'bleu{n}']:.3f}" for n in range(1, 5))
            rows.append({"what": f"BLEU-1..4, {label}", "value": bleu})
            rows.append({"what": f"loops, {label}", "value": f"{scores['degenerate']:.0%} of captions"})
    if card.likeness is not None:
        head, scores = card.likeness, card.likeness.map_at_10
        verdict = "used" if head.used else "not used: the raw space measured better"
        rows.append(
            {
                "what": f"likeness mAP@10 ({head.measured_on}), raw -> learned",
                "value": f"{scores['raw']:.3f} -> {scores['learned']:.3f} ({verdict})",
            }
        )
    return rows
