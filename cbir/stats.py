"""Per-task tallies: what each Spark task counts and times, summed on the driver for a run's summary."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Protocol


@dataclass
class TaskStats:
    """Rows by status, failures by reason, seconds by stage, and other counts (bytes, features reused,
    rows per query id): typed fields instead of "failed:<reason>" and "seconds:<stage>" keys."""

    status: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)
    seconds: Counter = field(default_factory=Counter)
    counts: Counter = field(default_factory=Counter)

    def __iadd__(self, other: TaskStats) -> TaskStats:
        for name in self._names():
            getattr(self, name).update(getattr(other, name))
        return self

    def to_json(self) -> str:
        return json.dumps({name: getattr(self, name) for name in self._names()})

    @classmethod
    def from_json(cls, text: str) -> TaskStats:
        return cls(**{name: Counter(values) for name, values in json.loads(text).items()})

    @classmethod
    def _names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


class RunSummary(Protocol):
    """What every run's summary offers (ingest and crawl, index, query, eval)."""

    def rows(self) -> list[dict]:
        """The summary table, (what, count) or (what, value) rows: printed and kept as a Prefect artifact."""

    def as_dict(self) -> dict:
        """JSON-ready data: what the flow returns."""


@dataclass
class ImagesSummary:
    """The base of the summaries of runs over images (ingest and crawl, index): begun when the run starts,
    stopped when it is tallied; `seconds` and `images_per_s` are the subclass's."""

    started: float = field(default_factory=time.monotonic, repr=False, kw_only=True)

    def stop(self) -> None:
        self.seconds = time.monotonic() - self.started

    def as_dict(self) -> dict:
        data = {key: value for key, value in asdict(self).items() if key != "started"}
        return {**data, "images_per_s": round(self.images_per_s, 2)}
