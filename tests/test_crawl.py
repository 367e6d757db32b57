"""Crawl: the real flickrapi client against a fake Flickr, URL lists against a misbehaving host,
the private-address guard, incremental reruns, and secrets kept out of logs, tables and Prefect."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from cbir.errors import UsageError
from cbir.images import ImageRejected
from cbir.lake import Lake
from cbir.reader import Listing, read_web_entries, resolve_url_list
from jobs import ingest
from jobs.crawl import flickr
from jobs.crawl.download import Downloader, refused_reason, target
from jobs.job import run as run_job

from conftest import (
    cbir_process,
    cluster_state_dir,
    image_bytes,
    make_settings,
    s3_lake,
    summary_count,
    task_runs,
    wait_until,
)
from fakeweb import GOOD_KEY, GOOD_SECRET, FakeWeb

FAST = [
    "crawl.timeout_s=1",
    "crawl.retries=2",
    "crawl.backoff_s=0.01",
    "crawl.max_wait_s=2",
    "crawl.per_host_per_s=1000",
    "ingest.max_bytes=300000",
]


@pytest.fixture(scope="module")
def web():
    server = FakeWeb()
    yield server
    server.shutdown()


def crawl_settings(tmp_path, web, *extra):
    return make_settings(
        tmp_path,
        *FAST,
        "crawl.allow_hosts=127.0.0.1",
        f"flickr.rest_url={web.base}/services/rest/",
        f"flickr.api_key={GOOD_KEY}",
        f"flickr.api_secret={GOOD_SECRET}",
        "flickr.rate_limit_wait_s=0.1",
        *extra,
    )


def manifest(settings) -> dict[str, dict]:
    return {row["uri"]: row for row in Lake.open(settings).table("manifest").read().to_pylist()}


def crawl_list(spark, settings, path: Path, retry_failed: bool = False):
    source = resolve_url_list(str(path), settings)
    return run_job(
        ingest.IngestJob(
            Lake.open(settings), settings, Listing(source.uri, read_web_entries(source)), retry_failed=retry_failed
        ),
        spark,
    )


def test_url_list_records_every_outcome_and_a_rerun_fetches_only_the_rest(spark, web, tmp_path):
    settings = crawl_settings(tmp_path, web, "crawl.resize=200")
    b = web.base
    expected = {
        f"{b}/img/1.jpg": ("ok", None),
        f"{b}/img/2.png": ("ok", None),
        f"{b}/flaky.jpg": ("ok", None),  # 503, then fine: retried
        f"{b}/limited.jpg": ("ok", None),  # 429 with Retry-After, then fine
        f"{b}/large.jpg": ("ok", None),  # stored shrunk to crawl.resize
        f"{b}/img/100.jpg": ("ok", None),
        f"{b}/moved.jpg": ("duplicate", None),  # a redirect to the same bytes
        f"{b}/slow.jpg": ("failed", "timeout"),
        f"{b}/broken.jpg": ("failed", "http-500"),
        f"{b}/missing.jpg": ("failed", "http-404"),
        f"{b}/page.html": ("failed", "not-an-image"),
        f"{b}/big.jpg": ("failed", "too-large"),
        f"{b}/endless.jpg": ("failed", "too-large"),
        f"{b}/to-private.jpg": ("failed", "refused-address"),
        f"{b}/loop.jpg": ("failed", "too-many-redirects"),
        "ftp://example.com/a.jpg": ("failed", "unsupported-uri"),
        "file:///etc/passwd": ("failed", "unsupported-uri"),
    }
    first = [f"{b}/img/1.jpg", f"{b}/flaky.jpg", f"{b}/broken.jpg"]
    (tmp_path / "first.txt").write_text("\n".join(first) + "\n")
    with open(tmp_path / "urls.jsonl", "w") as handle:
        for i, url in enumerate(expected):
            handle.write(json.dumps({"url": url, "title": f"title {i}"}) + "\n")
    handle_rows = crawl_list(spark, settings, tmp_path / "first.txt")  # an earlier, partial crawl
    assert (handle_rows.ingested, handle_rows.failed) == (2, {"http-500": 1})
    hits_before = dict(web.hits)

    summary = crawl_list(spark, settings, tmp_path / "urls.jsonl")

    rows = manifest(settings)
    assert {u: (r["status"], (r["error"] or "").split(":")[0] or None) for u, r in rows.items()} == expected
    assert summary.skipped == 3 and summary.found == len(expected)
    assert web.hits["/img/1.jpg"] == hits_before["/img/1.jpg"] and web.hits["/flaky.jpg"] == 2  # not fetched again
    assert web.hits["/broken.jpg"] == 3  # 1 + crawl.retries, in the first crawl only
    assert rows[f"{b}/img/2.png"]["title"] == "title 1"
    large = rows[f"{b}/large.jpg"]
    assert max(large["width"], large["height"]) == 200 and large["bytes"] < 400 * 300
    assert "10.255.255.1" in rows[f"{b}/to-private.jpg"]["error"]
    assert summary.bytes == sum(
        r["bytes"] for r in rows.values() if r["status"] == "ok" and r["run_id"] == summary.run_id
    )

    again = crawl_list(spark, settings, tmp_path / "urls.jsonl")
    assert (again.skipped, again.probed) == (len(expected), 0)
    assert len(manifest(settings)) == len(expected)

    broken_hits = web.hits["/broken.jpg"]
    retried = crawl_list(spark, settings, tmp_path / "urls.jsonl", retry_failed=True)
    failed = sum(status == "failed" for status, _ in expected.values())
    assert (retried.probed, retried.skipped, sum(retried.failed.values())) == (failed, len(expected) - failed, failed)
    assert web.hits["/broken.jpg"] == broken_hits + 3  # asked again, with its retries


def test_without_the_allow_list_local_addresses_are_refused(spark, web, tmp_path):
    settings = make_settings(tmp_path, *FAST)
    (tmp_path / "urls.csv").write_text(f"uri,caption\n{web.base}/img/31.jpg,a dog\n")
    hits = web.hits["/img/31.jpg"]

    summary = crawl_list(spark, settings, tmp_path / "urls.csv")

    assert summary.failed == {"refused-address": 1} and web.hits["/img/31.jpg"] == hits  # never contacted
    assert manifest(settings)[f"{web.base}/img/31.jpg"]["caption"] == "a dog"


@pytest.mark.parametrize(
    "host, allow, refused",
    [
        ("127.0.0.1", [], True),
        ("localhost", [], True),
        ("10.1.2.3", [], True),
        ("169.254.169.254", [], True),
        ("::1", [], True),
        ("224.0.0.1", [], True),
        ("100.64.0.1", [], True),
        ("8.8.8.8", [], False),
        ("127.0.0.1", ["127.0.0.1"], False),
        ("10.1.2.3", ["10.0.0.0/8"], False),
        ("localhost", ["localhost"], False),
        ("10.1.2.3", ["10.2.0.0/16"], True),
    ],
)
def test_the_address_guard(host, allow, refused):
    assert (refused_reason(host, 80, allow) is not None) == refused


def test_an_unknown_host_is_a_dns_failure():
    with pytest.raises(ImageRejected, match="^dns: "):
        refused_reason("no-such-host.invalid", 80, [])


def test_flickr_crawl_pages_waits_out_rate_limits_and_keeps_secrets_out(prefect_server, spark, web, tmp_path):
    from flows.crawl import crawl_flickr_flow

    settings = crawl_settings(tmp_path, web, "flickr.per_page=3", "flickr.sizes=b,z")
    web.searches.clear()
    web.rate_limited_pages.add(2)

    state = crawl_flickr_flow(
        text="dogs",
        tags="dog,park",
        license="1,2",
        sort="date-posted-desc",
        max_photos=6,
        settings=settings,
        return_state=True,
    )

    assert state.is_completed()
    summary = state.result()
    assert (summary["found"], summary["ingested"], summary["failed"]) == (6, 5, {"no-size": 1})
    assert [s["page"] for s in web.searches] == ["1", "2", "2"]  # page 2 again after the 429
    assert task_runs(state.state_details.flow_run_id) == {
        "flickr page": "COMPLETED",
        "list new items": "COMPLETED",
        "store images": "COMPLETED",
        "commit": "COMPLETED",
    }
    call = web.searches[0]
    assert (call["text"], call["tags"], call["license"], call["sort"]) == (
        "dogs",
        "dog,park",
        "1,2",
        "date-posted-desc",
    )
    assert {"license", "date_taken", "owner_name", "tags", "url_b", "url_z"} <= set(call["extras"].split(","))
    rows = {row["source_id"]: row for row in manifest(settings).values()}
    assert rows["flickr:9000"]["uri"].endswith("size=b") and rows["flickr:9001"]["uri"].endswith("size=z")
    photo = rows["flickr:9001"]
    assert (photo["title"], photo["tags"], photo["owner"], photo["license"], photo["taken_at"]) == (
        "A <script>photo</script> number 1",
        ["dog", "park1"],
        "Owner <b>1</b>",
        "1",
        "2020-02-01 10:00:00",
    )
    assert photo["page_url"] == "https://www.flickr.com/photos/owner1@N01/9001"
    assert rows["flickr:9003"]["status"] == "failed" and "flickr.sizes=b,z" in rows["flickr:9003"]["error"]

    more = crawl_flickr_flow(text="dogs", max_photos=7, settings=settings)  # a later crawl: only photo 9006 is new
    assert (more["found"], more["skipped"], more["ingested"]) == (7, 6, 1)

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
        )
        logs = client.read_logs()
    table = next(a.data for a in artifacts if a.key == "crawl-summary")
    counts = {row["what"]: row["count"] for row in (json.loads(table) if isinstance(table, str) else table)}
    assert counts["downloaded"] == 5 and counts["failed: no-size"] == 1
    lake_bytes = b"".join(p.read_bytes() for p in Path(settings.lake).rglob("*") if p.is_file())
    written = [
        json.dumps(run.parameters, default=str),
        json.dumps([a.model_dump(mode="json") for a in artifacts]),
        " ".join(log.message for log in logs),
    ]  # every line the flows printed or logged
    for secret in (GOOD_KEY, GOOD_SECRET):
        assert secret.encode() not in lake_bytes and not any(secret in text for text in written)


def test_flickr_refusals_are_one_clear_line(web, tmp_path):
    settings = crawl_settings(tmp_path, web)
    with pytest.raises(UsageError, match="^Flickr refused the search: 3: Unknown sort order$"):
        list(flickr.search(settings.flickr, flickr.Search(text="dogs", sort="interestingness-desc")))
    with pytest.raises(UsageError, match="needs --text, --tags or --bbox"):
        list(flickr.search(settings.flickr, flickr.Search()))


def test_a_bad_key_stops_the_crawl_with_one_line(web, tmp_path, cli_environment):
    environment = {
        **cli_environment,
        "CBIR_FLICKR__API_KEY": "wrong-key-31337",
        "CBIR_FLICKR__API_SECRET": "shh-31337",
        "CBIR_FLICKR__REST_URL": f"{web.base}/services/rest/",
        "CBIR_STATE_DIR": str(tmp_path / "state"),
        "CBIR_LAKE": str(tmp_path / "lake"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "cli", "crawl", "flickr", "--text", "dogs", "--max", "5"],
        capture_output=True,
        text=True,
        env=environment,
        cwd=Path(__file__).resolve().parents[1],
        timeout=300,
    )

    assert result.returncode == 2, result.stderr[-2000:]
    assert [line for line in result.stderr.splitlines() if line.startswith("cbir: error")] == [
        "cbir: error: Flickr refused the API key (flickr.api_key, flickr.api_secret): 100: "
        "Invalid API Key (Key has invalid format)"
    ]
    assert "31337" not in result.stdout + result.stderr


def test_the_scheduled_crawl_runs_on_the_configured_cron(tmp_path):
    from flows.serve import scheduled_crawl

    settings = make_settings(tmp_path, "crawl.schedule=15 */6 * * *")
    deployment = scheduled_crawl(settings, flickr.Search(text="two dogs", tags="dog", max_photos=50))

    assert [s.schedule.cron for s in deployment.schedules] == ["15 */6 * * *"]
    assert deployment.parameters == {
        "text": "two dogs",
        "tags": "dog",
        "tag_mode": "any",
        "sort": "relevance",
        "max_photos": 50,
    }  # settings (and secrets) load where the run happens


# The guard against hostile URLs and hosts, on one Downloader (no Spark).
def downloader(tmp_path, *extra, resolve=None):
    settings = make_settings(tmp_path, *FAST, *extra)
    return Downloader(settings.crawl, settings.ingest.max_bytes, **({"resolve": resolve} if resolve else {}))


def public_example(real):
    """getaddrinfo where example.com is a public address and everything else is real."""

    def resolve(host, port, *args, **kwargs):
        if host == "example.com":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", port))]
        return real(host, port, *args, **kwargs)

    return resolve


@pytest.mark.parametrize("path", ["\\@example.com/img/7.jpg", "\\@example.com/../img/7.jpg"])
def test_a_backslash_cannot_steer_the_guard_to_another_host(web, tmp_path, monkeypatch, path):
    monkeypatch.setattr(socket, "getaddrinfo", public_example(socket.getaddrinfo))
    hits = sum(web.hits.values())
    with pytest.raises(ImageRejected, match="^bad-url: "):
        downloader(tmp_path).fetch(f"{web.base}{path}")
    assert sum(web.hits.values()) == hits  # 127.0.0.1 never asked


def test_a_redirect_with_a_backslash_is_refused(web, tmp_path, monkeypatch):
    monkeypatch.setattr(socket, "getaddrinfo", public_example(socket.getaddrinfo))
    host = f"127.0.0.1:{web.server_address[1]}"
    with pytest.raises(ImageRejected, match="^bad-url: "):  # the first hop is allowed, the Location is not
        downloader(tmp_path, f"crawl.allow_hosts={web.base[7:].split(':')[0]}").fetch(f"http://{host}/to-backslash.jpg")
    assert web.hits["/img/8.jpg"] == 0


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com /a.jpg",
        "http://exa\tmple.com/a.jpg",
        "http://example.com/\x00",
        "http://[::1/a.jpg",
        "http://example.com:99999/a.jpg",
    ],
)
def test_urls_the_parsers_could_read_differently_are_refused(url):
    with pytest.raises(ImageRejected, match="^(bad-url|unsupported-uri): "):
        target(url)


def test_a_name_that_rebinds_after_the_check_is_still_dialled_at_the_checked_address(web, tmp_path, monkeypatch):
    """A zero-TTL name: 127.0.0.1 (allowed here, standing for a public address) first, 127.0.0.2 next."""
    secret = FakeWeb(host="127.0.0.2", port=web.server_address[1])
    real, answers = socket.getaddrinfo, iter(["127.0.0.1"] + ["127.0.0.2"] * 20)

    def rebinding(host, port, *args, **kwargs):
        if host == "rebind.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    try:
        fetcher = downloader(tmp_path, "crawl.allow_hosts=127.0.0.1")
        data = fetcher.fetch(f"http://rebind.test:{web.server_address[1]}/img/9.jpg")
    finally:
        secret.shutdown()
    assert data == image_bytes(9) and sum(secret.hits.values()) == 0


@pytest.mark.parametrize(
    "address",
    [
        "64:ff9b::7f00:1",
        "64:ff9b:1::a00:1",
        "2002:7f00:1::1",
        "::7f00:1",
        "::ffff:10.0.0.1",
        "::ffff:0:7f00:1",  # SIIT's IPv4-translated ::ffff:0:0:0/96: 127.0.0.1
        "::ffff:0:a9fe:a9fe",  # the same: 169.254.169.254, cloud metadata
        "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, whose client is 127.0.0.1
        "fec0::1",  # site-local
    ],
)
def test_ipv6_translations_of_ipv4_are_refused_unless_allowed(address):
    def resolve(host, port, *args, **kwargs):
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0))]

    assert refused_reason("nat64.test", 80, [], resolve) is not None
    assert refused_reason("nat64.test", 80, [address], resolve) is None


@pytest.mark.parametrize(
    "path, extra, bound",
    [
        ("/trickle.jpg", [], 2.5),  # a byte every 0.2 s, each within crawl.timeout_s
        ("/trickle-headers.jpg", [], 2.5),  # the same with the headers
        ("/always-busy.jpg", ["crawl.retries=10", "crawl.max_wait_s=60"], 2.5),  # 503 + Retry-After on every try
        ("/busy-hop.jpg", ["crawl.max_redirects=20"], 2.5),  # 503 + Retry-After on every hop
    ],
)
def test_one_deadline_per_url_bounds_hops_retries_and_the_body(web, tmp_path, path, extra, bound):
    fetcher = downloader(tmp_path, "crawl.allow_hosts=127.0.0.1", "crawl.deadline_s=1.5", *extra)
    start = time.monotonic()
    with pytest.raises(ImageRejected, match="^timeout: .*crawl.deadline_s=1.5"):
        fetcher.fetch(f"{web.base}{path}")
    assert time.monotonic() - start < bound


@pytest.mark.parametrize(
    "tags, extra, refused",
    [
        (["noai"], [], True),
        (["noindex, nofollow"], [], True),
        (["noimageai"], [], True),
        (["NoImageIndex"], [], True),
        (["otherbot: noai"], [], False),
        (["cbir: noai"], [], True),
        (["none"], [], True),  # noindex, nofollow
        (["cbir: none"], [], True),
        (["otherbot: none"], [], False),
        (["unavailable_after: 25 Jun 2030 15:00:00 PST, noai"], [], True),  # a date's colons name no agent
        (["max-image-preview: large, NoAI"], [], True),
        (["all"], [], False),
        ([], [], False),
        (["noindex"], ["crawl.opt_out_tokens=noai"], False),
        (["noai"], ["crawl.opt_out_tokens=[]"], False),
    ],
)
def test_x_robots_tag_opt_outs_are_honoured(web, tmp_path, tags, extra, refused):
    url = f"{web.base}/robots/x.jpg?" + urlencode([("tag", t) for t in tags])
    fetcher = downloader(tmp_path, "crawl.allow_hosts=127.0.0.1", *extra)
    if refused:
        with pytest.raises(ImageRejected, match="^opted-out: 127.0.0.1 says X-Robots-Tag: "):
            fetcher.fetch(url)
    else:
        assert fetcher.fetch(url) == image_bytes(6)


def test_the_user_agent_names_cbir_and_the_contact_url(web, tmp_path):
    downloader(tmp_path, "crawl.allow_hosts=127.0.0.1", "crawl.contact_url=https://example.org/crawler").fetch(
        f"{web.base}/img/10.jpg"
    )
    assert "cbir/0.1 (caption-based image search crawler; +https://example.org/crawler)" in web.user_agents
    with pytest.raises(UsageError, match="crawl.user_agent"):
        make_settings(tmp_path, "crawl.user_agent=Mozilla/5.0")


@pytest.mark.slow
def test_a_lost_executor_mid_crawl_is_retried_and_each_url_stored_once(
    cluster, web, bucket, s3_endpoint, tmp_path, cli_environment
):
    urls = [f"{web.base}/pause/{1000 + i}.jpg" for i in range(40)]
    (tmp_path / "urls.txt").write_text("\n".join(urls) + "\n")
    overrides = [
        *FAST,
        "crawl.allow_hosts=127.0.0.1",
        "crawl.concurrency=1",  # one download at a time: 8 tasks of 5, about a second each
        *s3_lake(bucket, s3_endpoint),
        f"state_dir={cluster_state_dir(cluster)}",  # where the driver finds the cluster's secret
        f"spark.master={cluster.url}",
    ]
    driver = cbir_process(cli_environment, tmp_path, "crawl", "urls", str(tmp_path / "urls.txt"), overrides=overrides)

    def downloads() -> list[int]:
        return [web.hits[f"/pause/{1000 + i}.jpg"] for i in range(40)]

    wait_until(lambda: sum(downloads()) >= 12 and cluster.executor_pids(1), driver)
    killed = cluster.kill_executors(1)  # worker 1's executor, mid-download
    out, err = driver.communicate(timeout=600)

    assert killed and driver.returncode == 0, err[-3000:]
    assert summary_count(out + err, "downloaded") == 40 and summary_count(out + err, "tasks retried") >= 1
    rows = Lake.open(make_settings(tmp_path, *s3_lake(bucket, s3_endpoint))).table("manifest").read().to_pylist()
    assert sorted(row["uri"] for row in rows) == sorted(urls)  # each url stored once
    assert all(row["status"] == "ok" for row in rows) and len({row["image_id"] for row in rows}) == 40
    assert min(downloads()) >= 1 and sum(downloads()) - 40 <= 40 // 2 + 5  # again: the lost executor's share
