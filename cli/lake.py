"""The `cbir lake` verb: history, optimize, vacuum. History prints without Prefect; the others run
the maintenance flow."""

from __future__ import annotations

import argparse
import json

from cbir.errors import UsageError
from cbir.lake import Lake
from cbir.settings import Settings
from cbir.text import render_table
from jobs import maintenance

ACTIONS = ("history", "optimize", "vacuum")


def add_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "action",
        choices=ACTIONS,
        help="history TABLE: versions, runs, rows, when; optimize [TABLE]: compact small files; "
        "vacuum [TABLE]: remove files no version within maintenance.retention_hours needs",
    )
    sub.add_argument(
        "table",
        nargs="?",
        help="manifest, captions, features/<encoder>-<dtype> or features (default: every table; history needs one)",
    )
    sub.add_argument("--json", action="store_true", help="print the rows as one JSON line")


def command(args, settings: Settings) -> int:
    if args.action == "history":
        if not args.table:
            raise UsageError("cbir lake history needs a TABLE (manifest, captions, features/<encoder>-<dtype>)")
        lake = Lake.open(settings)
        lake.check()
        rows = maintenance.history(lake, args.table)
        print(json.dumps(rows) if args.json else render_table(f"{args.table} history ({lake.uri})", rows))
        return 0
    from cli.flow_runs import run_flow
    from flows.maintenance import maintenance_flow

    rows = run_flow(maintenance_flow, action=args.action, table=args.table, settings=settings)
    if args.json:
        print(json.dumps(rows))
    return 0
