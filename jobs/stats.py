"""Per-task tallies: what each Spark task counts and times, summed on the driver for a run's summary."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Protocol


@dataclass
class TaskStats:
    """Rows by status, failures by reason, seconds by stage, and other counts (bytes, features reused,
    rows per query id): typed fields instead of "failed:<reason>" and "seconds:<stage>" keys."""

    status: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)
    seconds: Counter = field(default_factory=Counter)
    counts: Counter = field(default_factory=Counter)

    def __iadd__(self, other: "TaskStats") -> "TaskStats":
        for name in self._names():
            getattr(self, name).update(getattr(other, name))
        return self

    def to_json(self) -> str:
        return json.dumps({name: getattr(self, name) for name in self._names()})

    @classmethod
    def from_json(cls, text: str) -> "TaskStats":
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
