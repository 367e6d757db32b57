"""Gallery: one self-contained HTML page per query run: each query, its top results as thumbnails
with caption and score. Thumbnails are embedded (data: URIs), every text is escaped."""

from __future__ import annotations

import base64
import html
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
from PIL import Image

from cbir.errors import CbirError
from cbir.images import upright_on_white
from cbir.lake import Lake
from cbir.settings import Settings
from cbir.storage import open_filesystem, put_bytes
from cbir.text import highlight, words
from search.duplicates import fold

THUMBNAIL = (160, 160)
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }}
section {{ margin-bottom: 2rem; }}
h2 {{ font-size: 1.05rem; margin: 0 0 .5rem; }}
.query img {{ vertical-align: middle; margin-right: .5rem; border-radius: 4px; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: .75rem; }}
figure {{ margin: 0; padding: .4rem; border: 1px solid #ddd; border-radius: 6px; background: #fafafa; }}
figure img {{ display: block; width: 160px; height: 160px; object-fit: contain; margin: auto; }}
figcaption {{ font-size: .8rem; margin-top: .3rem; overflow-wrap: anywhere; }}
.score {{ color: #555; font-variant-numeric: tabular-nums; }}
.matched {{ color: #444; }}
mark {{ background: #fde68a; color: inherit; }}
.errors td {{ padding: .1rem .6rem; }}
</style></head>
<body><h1>{title}</h1>
{body}
</body></html>
"""


def thumbnail_jpeg(data: bytes, size: tuple[int, int] = THUMBNAIL) -> bytes:
    """A small JPEG of the image (camera orientation applied, transparency on white), at most `size`."""
    with Image.open(io.BytesIO(data)) as image:
        # Shrunk while it is flattened (a JPEG decoded at 1/2 to 1/8 scale, others reduced band by band):
        # memory stays near the decoded image's own, whatever its mode.
        image = upright_on_white(image, size)
        image.thumbnail(size)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=80)
    return out.getvalue()


def thumbnail(data: bytes) -> str:
    """A data: URI of a small JPEG of the image."""
    return "data:image/jpeg;base64," + base64.b64encode(thumbnail_jpeg(data)).decode()


def _image_paths(lake: Lake, image_ids: set[str]) -> dict[str, str]:
    """Where the lake stores each image (its format is in the manifest)."""
    if not image_ids:
        return {}
    wanted = pa.array(sorted(image_ids), pa.string())
    rows = (
        lake.table("manifest")
        .dataset()
        .to_table(columns=["image_id", "format"], filter=ds.field("image_id").isin(wanted))
        .to_pylist()
    )
    paths = {}
    for r in rows:
        try:
            paths[r["image_id"]] = lake.image_path(r["image_id"], r["format"])
        except CbirError:  # a manifest row whose id or format is not cbir's (none, for a failed item): skipped
            continue
    return paths


def render(
    lake: Lake,
    settings: Settings,
    title: str,
    results: list[dict],
    queries: list,
    errors: list[tuple[str, str]],
    limit: int,
    vectors: dict[str, np.ndarray] | None = None,
) -> str:
    """The page: `results` are rows of the results table; `queries` the answered Query objects. With the results'
    likeness `vectors` (by image_id) and duplicates.fold, each near-duplicate folds under the first of them."""
    shown = queries[:limit]
    by_query: dict[str, list[dict]] = {}
    for row in sorted(results, key=lambda r: (r["query_id"], r["rank"])):
        by_query.setdefault(row["query_id"], []).append(row)
    if vectors is not None and settings.duplicates.fold:
        threshold = settings.duplicates.threshold
        by_query = {
            q: fold(rows, [vectors.get(r["image_id"]) for r in rows], threshold) for q, rows in by_query.items()
        }
    stored = _image_paths(lake, {r["image_id"] for q in shown for r in by_query.get(q.query_id, [])})
    sources = {q.query_id: q.image for q in shown if q.image}
    sources.update(
        {
            r["image_id"]: r["uri"]
            for q in shown
            for r in by_query.get(q.query_id, [])
            if r["image_id"] not in stored and r["uri"]
        }
    )
    thumbs = _thumbnails(lake, settings, stored, sources)

    body = []
    for query in shown:
        said = query.text if query.text is not None else query.caption
        picture = f'<img src="{thumbs[query.query_id]}" alt="">' if query.query_id in thumbs else ""
        kind = "image, captioned" if query.image else "text" if query.text is not None else "examples"
        if query.positive or query.negative:
            kind += f", {len(query.positive)} more like, {len(query.negative)} less like"
        body.append(
            f'<section><h2 class="query">{picture}{html.escape(query.query_id)} ({kind}): '
            f'&ldquo;{html.escape(said or "")}&rdquo;</h2><div class="grid">'
        )
        for row in by_query.get(query.query_id, []):
            image = thumbs.get(row["image_id"], "")
            if row.get("likeness") is None:
                scores = f"BLEU {row['score']:.4f}"
            else:
                scores = f"score {row['score']:.4f} &middot; likeness {row['likeness']:.3f}"
            matched = ""
            if row.get("matched_text"):
                marked = "".join(
                    f"<mark>{html.escape(piece)}</mark>" if hit else html.escape(piece)
                    for piece, hit in highlight(row["matched_text"], words(said))
                )
                matched = f'<span class="matched">{html.escape(row["matched_kind"] or "")}: {marked}</span><br>'
            if row.get("example"):
                matched += f'<span class="matched">looks like {html.escape(row["example"][-40:])}</span><br>'
            if row.get("folded"):
                matched += (
                    f"<small>{len(row['folded'])} more like this: "
                    + ", ".join(f"{c['rank']}. {html.escape(c['caption'] or '')}" for c in row["folded"])
                    + "</small><br>"
                )
            body.append(
                f'<figure><img src="{image}" alt="{html.escape(row["caption"] or "")}">'
                f"<figcaption>{row['rank']}. {html.escape(row['caption'] or '')}<br>{matched}"
                f'<span class="score">{scores}</span><br><small>{html.escape(row["image_id"][:12])}</small>'
                f"</figcaption></figure>"
            )
        if not by_query.get(query.query_id):
            body.append("<p>No results.</p>")
        body.append("</div></section>")
    if len(queries) > limit:
        body.append(f"<p>{len(queries) - limit} more queries are in the results table.</p>")
    if errors:
        body.append('<section><h2>Not answered</h2><table class="errors">')
        body += [f"<tr><td>{html.escape(q)}</td><td>{html.escape(reason)}</td></tr>" for q, reason in errors]
        body.append("</table></section>")
    return PAGE.format(title=html.escape(title), body="\n".join(body))


def duplicates_page(lake: Lake, settings: Settings, title: str, groups: list[list[dict]], limit: int) -> str:
    """The page of `cbir duplicates`, for a person to review: each group of near-duplicates a row of
    thumbnails, its representative first, every member with its caption, uri and cosine with the first.
    `groups` hold image_id, uri, caption and cosine; the first `limit` are shown."""
    shown = groups[:limit]
    stored = _image_paths(lake, {m["image_id"] for group in shown for m in group})
    sources = {m["image_id"]: m["uri"] for group in shown for m in group if m["image_id"] not in stored and m["uri"]}
    thumbs = _thumbnails(lake, settings, stored, sources)
    body = []
    for number, group in enumerate(shown, start=1):
        body.append(f'<section><h2>group {number}: {len(group)} images</h2><div class="grid">')
        for n, member in enumerate(group):
            caption, uri = html.escape(member["caption"] or ""), html.escape(member["uri"] or "")
            like = "representative" if n == 0 else f"cosine {member['cosine']:.3f}"
            body.append(
                f'<figure><img src="{thumbs.get(member["image_id"], "")}" alt="{caption}"><figcaption>{caption}<br>'
                f'<span class="score">{like}</span><br><small>{uri}</small><br>'
                f"<small>{html.escape(member['image_id'][:12])}</small></figcaption></figure>"
            )
        body.append("</div></section>")
    if not groups:
        body.append("<p>No near-duplicates.</p>")
    if len(groups) > limit:
        body.append(f"<p>{len(groups) - limit} more groups are in the table that cbir duplicates printed.</p>")
    return PAGE.format(title=html.escape(title), body="\n".join(body))


def _thumbnails(lake: Lake, settings: Settings, stored: dict[str, str], sources: dict[str, str]) -> dict[str, str]:
    """Thumbnails by key, from the lake's store or a source uri; an image that cannot be read has none."""

    def make(item: tuple[str, str, bool]) -> tuple[str, str | None]:
        key, path, in_lake = item
        try:
            fs, at = (lake.fs, path) if in_lake else open_filesystem(path, settings.s3)
            with fs.open_input_stream(at) as stream:
                return key, thumbnail(stream.read(settings.ingest.max_bytes + 1))
        except Exception:  # noqa: BLE001 - a missing picture must not lose the page
            return key, None

    items = [(k, p, True) for k, p in stored.items()] + [(k, p, False) for k, p in sources.items()]
    with ThreadPoolExecutor(8) as pool:
        return {key: uri for key, uri in pool.map(make, items) if uri}


def write(lake: Lake, run_id: str, page: str) -> str:
    """Save the page in the run's folder; returns its URI."""
    path = lake.path("queries", run_id, "gallery.html")
    put_bytes(lake.fs, path, page.encode("utf-8"), overwrite=True)
    return lake.uri_of(path)
