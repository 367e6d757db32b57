"""What a person sees of a run: progress in the terminal and the Prefect UI, and a summary table."""

from __future__ import annotations

import time

from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact

from cbir.stats import RunSummary
from cbir.text import render_table


class Progress:
    """A Prefect progress artifact plus a terminal line at every tenth, fed (done, total) steps."""

    def __init__(
        self, key: str, description: str, unit: str = "Spark tasks", announce: bool = True, min_interval_s: float = 2.0
    ):
        self.description, self.unit, self.announce = description, unit, announce
        self.artifact = create_progress_artifact(progress=0.0, key=key, description=description)
        self.min_interval_s = min_interval_s
        self.shown_tenth = 0
        self.updated_at = 0.0

    def __call__(self, done: int, total: int) -> None:
        percent = 100.0 * done / total if total else 0.0
        now = time.monotonic()
        if now - self.updated_at >= self.min_interval_s:
            update_progress_artifact(self.artifact, percent)
            self.updated_at = now
        if self.announce and int(percent // 10) > self.shown_tenth:
            self.shown_tenth = int(percent // 10)
            print(f"{self.description}: {percent:.0f}% ({done}/{total} {self.unit})")

    def finish(self) -> None:
        update_progress_artifact(self.artifact, 100.0)
        if self.announce and self.shown_tenth < 10:
            print(f"{self.description}: 100%")


def publish_summary(key: str, title: str, rows: list[dict]) -> None:
    """Print the summary and keep it as a Prefect table artifact."""
    print("\n" + render_table(title, rows))
    create_table_artifact(table=rows, key=key, description=title)


def publish(kind: str, title: str, summary: RunSummary) -> dict:
    """A run's summary as the `<kind>-summary` table, printed and kept; returns it as data (the flow's result)."""
    publish_summary(f"{kind}-summary", title, summary.rows())
    return summary.as_dict()
