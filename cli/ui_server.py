"""cbir ui's Prefect server: Prefect's own `prefect server start`, serving only the Host names in
_CBIR_UI_HOSTS, so a page that rebinds its own name to this machine cannot reach the API (its
origin would be its own, which CORS and CSRF alone do not stop)."""

from __future__ import annotations

import os

import prefect.server.api.server as server
from starlette.middleware.trustedhost import TrustedHostMiddleware

_create_app = server.create_app


def create_app(*args, **kwargs):
    app = _create_app(*args, **kwargs)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=os.environ["_CBIR_UI_HOSTS"].split(","))
    return app


if __name__ == "__main__":
    from prefect.cli import app as prefect_cli

    server.create_app = create_app  # `prefect server start` looks it up when it starts uvicorn
    prefect_cli()
