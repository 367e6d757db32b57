"""Deployments: what `cbir serve` serves to a Prefect server.

- `crawl-flickr/scheduled-crawl`: a Flickr search on the cron of crawl.schedule;
- `index/scheduled-index`: caption what is new, on the cron of index.schedule;
- `query/on-demand`: a batch query file, run from the Prefect UI's form (or the API);
- `lake-maintenance/scheduled-maintenance`: compact the Delta tables' small files, then vacuum, on the
  cron of maintenance.schedule.

The deployments are the pipeline's own flow objects, so their runs sit beside the commands'. No
setting, and no secret, is ever a deployment parameter: the flows' `settings` parameter is left out
of the form, and every served run loads its settings from the environment
of the process that serves it.
"""

from __future__ import annotations

from cbir.settings import Settings
from flows.crawl import crawl_flickr_flow
from flows.index import index_flow
from flows.maintenance import maintenance_flow
from flows.query import query_flow
from jobs.crawl.flickr import Search


def deployments(settings: Settings, search: Search | None) -> list:
    """The deployments; the crawl is paused until it has a search (a run from the UI can give one)."""
    return [
        scheduled_crawl(settings, search),
        scheduled_index(settings),
        on_demand_query(),
        scheduled_maintenance(settings),
    ]


def scheduled_crawl(settings: Settings, search: Search | None):
    """The Flickr search as a deployment on crawl.schedule."""
    if search is not None:
        search.check()
    parameters = {k: v for k, v in vars(search).items() if v is not None} if search else {}
    description = (
        f"crawl {search.describe()}"
        if search
        else "paused: no search yet (cbir serve --text/--tags/--bbox, or a custom run with one)"
    )
    return _without_settings(
        crawl_flickr_flow.to_deployment(
            name="scheduled-crawl",
            cron=settings.crawl.schedule,
            paused=search is None,
            parameters=parameters,
            description=description,
            tags=["cbir"],
        )
    )


def scheduled_index(settings: Settings):
    return _without_settings(
        index_flow.to_deployment(
            name="scheduled-index",
            cron=settings.index.schedule,
            tags=["cbir"],
            description="caption the images that are new since the last index run",
        )
    )


def scheduled_maintenance(settings: Settings):
    return _without_settings(
        maintenance_flow.to_deployment(
            name="scheduled-maintenance",
            cron=settings.maintenance.schedule,
            tags=["cbir"],
            description="compact the lake's small files, then vacuum the ones no recent version needs",
        )
    )


def on_demand_query():
    return _without_settings(
        query_flow.to_deployment(
            name="on-demand",
            tags=["cbir"],
            description="answer a batch query file: results table, gallery and artifacts",
        )
    )


def _without_settings(deployment):
    """The form without the flow's `settings` parameter: a served run loads its own."""
    schema = deployment._parameter_openapi_schema
    schema.properties.pop("settings", None)
    schema.definitions = {}  # only the settings' sections were defined there
    return deployment
