"""Running a flow from the command line: its one-line errors without tracebacks, and without Prefect's lines
about the temporary server it starts and stops."""

from __future__ import annotations

import logging

from cbir.errors import CbirError


def run_flow(flow, **parameters):
    """Run a flow (Prefect has set up its logging by the time one is imported) without printing
    tracebacks for CbirErrors: their one line says it all, and the run's log in Prefect keeps the rest."""

    def drop_traceback(record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], CbirError):
            record.exc_info, record.exc_text = None, None
        return True

    def drop_temporary_server(record: logging.LogRecord) -> bool:
        # Prefect's "Starting temporary server on http://127.0.0.1:PORT / See https://..." and "Stopping ...":
        # the port is gone when the command ends, and `cbir ui` serves the runs it recorded.
        return not (
            record.name == "prefect"
            and record.levelno == logging.INFO
            and record.getMessage().startswith(("Starting temporary server", "Stopping temporary server"))
        )

    for handler in logging.getLogger().handlers:
        handler.addFilter(drop_traceback)
        handler.addFilter(drop_temporary_server)
    return flow(**parameters)
