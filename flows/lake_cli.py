"""The `cbir lake` verb: history, optimize, vacuum, upgrade. Kept apart from the command's parser (which only
hooks it in with add_arguments() and command()) and free of Prefect until a flow runs."""

from __future__ import annotations

import argparse
import json

from cbir.errors import UsageError
from cbir.lake import RETENTION_HOURS, Lake
from cbir.settings import Settings
from jobs import maintenance

ACTIONS = ("history", "optimize", "vacuum", "upgrade")


def add_arguments(sub: argparse.ArgumentParser) -> None:
    """`cbir lake ACTION [TABLE]` (the parser hook in flows/cli.py calls this)."""
    sub.add_argument("action", choices=ACTIONS, help="history TABLE: versions, runs, rows, when; "
                     "optimize [TABLE]: compact small files; vacuum [TABLE]: remove files no version within the "
                     "retention needs; upgrade: convert a lake in the old layout (once)")
    sub.add_argument("table", nargs="?", help="manifest, captions, features/<encoder>-<dtype> or features "
                     "(default: every table; history needs one)")
    sub.add_argument("--retain-hours", type=int, default=RETENTION_HOURS,
                     help=f"vacuum keeps what versions of this many last hours need (default {RETENTION_HOURS})")
    sub.add_argument("--json", action="store_true", help="print the rows as one JSON line")


def command(args, settings: Settings) -> int:
    """The `cbir lake` verb."""
    if args.action == "history":
        if not args.table:
            raise UsageError("cbir lake history needs a TABLE (manifest, captions, features/<encoder>-<dtype>)")
        lake = Lake.open(settings)
        lake.check()
        rows = maintenance.history(lake, args.table)
        if args.json:
            print(json.dumps(rows))
        else:
            from flows.reporting import render_table

            print(render_table(f"{args.table} history ({lake.uri})", rows or [{"version": "none"}]))
        return 0
    if args.action == "upgrade" and args.table:
        raise UsageError("cbir lake upgrade converts the whole lake: it takes no TABLE")
    from flows.cli import run_flow
    from flows.maintenance import maintenance_flow

    rows = run_flow(maintenance_flow, action=args.action, table=args.table, retention_hours=args.retain_hours,
                    settings=settings)
    if args.json:
        print(json.dumps(rows))
    return 0


