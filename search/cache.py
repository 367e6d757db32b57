"""Index cache: the searcher's BLEU index saved under the state folder, so that `cbir search` and
`cbir web` build it once per lake state and memory-map it after that.

    <state_dir>/search-index/<key>/
        meta.json            the key (what the index was built from), counts, max_order
        table.arrow          the rows hits show: image_id, uri, caption (and extra manifest columns)
        references.arrow     every reference text and its kind, grouped by row; counts.npy: how many each
        engine_rows.npy      the engine's images as the table's rows, in engine order; vocabulary.arrow: its words by id
        <array>.npy          the engine's arrays (BleuIndex.ARRAYS)
        visual.npy           the images' vectors in the captioner memory's space, when the captions have them

The key is everything the index depends on: the lake, the captioner version, the lake state of the
tables read (lake_state), the reference kinds, the n-gram order, the extra columns and FORMAT.
Anything else means another key, so a stale index is never found. An entry is written into a
temporary folder and renamed into place whole; one that does not load (truncated, wrong shapes,
another format, values out of range) is deleted and built again. Only the newest KEEP entries of each
lake stay. Opening an entry checks more than shapes: the engine's kernels index arrays by other arrays'
values without bounds checks, so each such value is checked to be in range first (BleuIndex.from_state),
and so is every row number the Index looks up (here); a tampered entry is rebuilt, never run.
No pickles: numpy's .npy (loaded copy-on-write memory-mapped) and Arrow IPC files.

The query job's Spark tasks save their shares the same way, one entry per share, under
`<state_dir>/search-index/shares/<key>/` of the machine that runs the task (share_key, open_share,
save_share): the key is the captions' identity (the lake, the captioner version and the captions
table's pinned Delta version, or a foreign table's files), the reference kinds, max_order, the
number of shares and the share's number. Only the newest KEEP states of each captions source keep
their shares. A share that is not there, or does not load, is built by the task that needs it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from cbir.engine import BleuIndex
from cbir.lake import Lake
from cbir.references import SOURCE, References
from cbir.storage import fsync_dir, fsync_file
from search.index import Index, version_captions

log = logging.getLogger("cbir.search")

FORMAT = 4  # bump when the layout or the engine's arrays change (4: engine_rows.npy, not image_ids.arrow)
FOLDER = "search-index"
SHARES = "shares"  # the query job's shares: <state_dir>/search-index/shares/<key>/
KEEP = 4  # entries per lake: cbir search's and cbir web's (which holds a column more) of the two newest states
STALE_TMP_S = 3600  # a temporary folder this old was left by a crash
STATS: Counter = Counter()  # built, loaded, discarded, saved: what this process did (tests read it)


def lake_state(lake: Lake, tables: Iterable[str]) -> dict[str, str | None]:
    """The identity of what these tables hold now: each one's Delta table id and version."""
    return {name: lake.table(name).state() for name in tables}


def index_key(lake: Lake, version: str | None, kinds: Iterable[str], max_order: int, extra: Iterable[str] = ()) -> dict:
    """What an index of this lake's captions depends on (the manifest counts when source texts or its
    columns are read)."""
    kinds, extra = sorted(set(kinds)), list(extra)
    tables = ["captions", *(["manifest"] if extra or any(kind in SOURCE for kind in kinds) else [])]
    return {
        "format": FORMAT,
        "lake": lake.uri,
        "version": version,
        "kinds": kinds,
        "max_order": max_order,
        "extra": extra,
        "tables": lake_state(lake, tables),
    }


def digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def cached_index(
    lake: Lake, state_dir: str, version: str | None, kinds: Iterable[str], max_order: int, extra: tuple[str, ...] = ()
) -> Index:
    """The index of this captioner version's captions: loaded from the cache when this lake state's is
    there, else built (and saved, unless the lake changed while it was being built)."""
    kinds = tuple(kinds)
    if version is None:  # nothing indexed: nothing worth caching
        return Index.build(version_captions(lake, version, kinds, extra=extra), kinds, max_order)
    root = Path(state_dir) / FOLDER
    key = index_key(lake, version, kinds, max_order, extra)
    folder = root / digest(key)
    started = time.perf_counter()
    index, damage = _open(folder, key)
    if damage is not None:
        STATS["discarded"] += 1
        log.warning("search index cache %s does not load (%s): building it again", folder, damage)
    if index is not None:
        STATS["loaded"] += 1
        log.info("search index loaded from %s in %.2f s", folder, time.perf_counter() - started)
        return index
    index = Index.build(version_captions(lake, version, kinds, extra=extra), kinds, max_order)
    STATS["built"] += 1
    log.info("search index built in %.1f s (%d images)", time.perf_counter() - started, len(index))
    if index_key(lake, version, kinds, max_order, extra) != key:
        return index  # the lake changed while the index was built: it belongs to neither state
    try:
        save(index, folder, key)
        prune(root, lake.uri, keep=folder)
    except OSError as exc:
        log.warning("search index not cached in %s: %s", root, exc)
    return index


def _open(folder: Path, key: dict) -> tuple[Index | None, str | None]:
    """(the entry's index, None); (None, None) when there is none; (None, why) when it does not load: then
    it is deleted, to be built again."""
    if not folder.is_dir():
        return None, None
    try:
        index = load(folder, key)
    except Exception as exc:  # noqa: BLE001 - any damage (truncated, wrong shapes, old format): build again
        shutil.rmtree(folder, ignore_errors=True)
        return None, _short(exc)
    _touch(folder)
    return index, None


# The query job's shares.
def share_key(identity: dict, kinds: Iterable[str], max_order: int, shares: int) -> dict:
    """What the index of every share of captions spread over `shares` Spark tasks by image_id depends on
    (a share's own key adds its number: share_of)."""
    return {"format": FORMAT, **identity, "kinds": sorted(set(kinds)), "max_order": max_order, "shares": shares}


def share_of(key: dict, share: int) -> dict:
    return {**key, "share": share}


def open_share(state_dir: str, key: dict) -> tuple[Index | None, str | None]:
    """A share's saved index under this machine's state folder: (index, None); (None, None): not saved;
    (None, why): it did not load and was deleted."""
    return _open(Path(state_dir) / FOLDER / SHARES / digest(key), key)


def save_share(state_dir: str, key: dict, index: Index) -> None:
    """Save a share's index (a failure is a warning: the next run builds it again)."""
    root = Path(state_dir) / FOLDER / SHARES
    folder = root / digest(key)
    try:
        save(index, folder, key)
        prune(root, _source(key), keep=folder, group=_state)
    except OSError as exc:
        log.warning("search share not saved in %s: %s", root, exc)


def _source(key: dict) -> str:
    return key.get("lake") or key.get("captions") or ""


def _state(key: dict) -> str:
    return digest({name: value for name, value in key.items() if name != "share"})


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 200 else text[:197] + "..."


def _touch(folder: Path) -> None:
    try:
        os.utime(folder / "meta.json")
    except OSError:
        pass  # read-only state folder: the entry just ages


# Writing.
def save(index: Index, folder: Path, key: dict) -> None:
    """Write the entry into a temporary folder, then rename it into place (another process may have won)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{folder.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_arrow(tmp / "table.arrow", index.table)
        meta = {"key": key, "rows": len(index.table), "empty": index.engine is None}
        if index.engine is not None:
            references = index.references
            _write_arrow(tmp / "references.arrow", pa.table({"text": references.texts, "kind": references.kinds}))
            _write_npy(tmp / "counts.npy", references.counts)
            arrays, image_ids, vocabulary = index.engine.state()
            for name, array in arrays.items():
                _write_npy(tmp / f"{name}.npy", array)
            _write_npy(tmp / "engine_rows.npy", np.fromiter(map(index.row_of.__getitem__, image_ids), np.int64))
            _write_arrow(tmp / "vocabulary.arrow", pa.table({"value": pa.array(vocabulary, pa.string())}))
            meta.update(max_order=index.engine.max_order, texts=len(references.texts), images=len(image_ids))
            if index.visual is not None:
                _write_npy(tmp / "visual.npy", index.visual)
            meta["visual"] = index.visual is not None
        meta_path = tmp / "meta.json"
        meta_path.write_text(json.dumps(meta, sort_keys=True))
        fsync_file(str(meta_path))
        fsync_dir(str(tmp))
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / "meta.json").is_file():
                raise
            return  # another search saved the same entry first
        fsync_dir(str(folder.parent))
        STATS["saved"] += 1
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def _write_arrow(path: Path, table: pa.Table) -> None:
    table = table.combine_chunks()
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=max(table.num_rows, 1))  # one batch: read back without a copy
    fsync_file(str(path))


def prune(root: Path, lake_uri: str, keep: Path, group=None) -> None:
    """Delete all but the KEEP most recently used entries of this lake (with `group`, a function of an entry's
    key: all but those of the KEEP most recently used groups), and temporary folders left by crashes."""
    entries = []
    for entry in root.iterdir():
        if entry.name.startswith(".tmp-"):
            try:
                if entry.stat().st_mtime < time.time() - STALE_TMP_S:
                    shutil.rmtree(entry, ignore_errors=True)
            except OSError:
                pass  # renamed or removed meanwhile
            continue
        try:
            meta = entry / "meta.json"
            key = json.loads(meta.read_text())["key"]
            if (_source(key) if group else key["lake"]) == lake_uri:
                entries.append((meta.stat().st_mtime, entry, group(key) if group else entry.name))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # not an entry of this lake (or being deleted)
    entries.sort(reverse=True)
    kept = list(dict.fromkeys(name for _, _, name in entries))[:KEEP]
    for _, entry, name in entries:
        if entry != keep and name not in kept:
            shutil.rmtree(entry, ignore_errors=True)


# Reading.
def load(folder: Path, key: dict) -> Index:
    """The index saved in folder; an error of some kind when it is damaged or not of this key."""
    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("key") != key:
        raise ValueError("the entry was saved for another key or format")
    table = _read_arrow(folder / "table.arrow")
    if table.num_rows != meta["rows"] or not {"image_id", "uri", "caption"} <= set(table.column_names):
        raise ValueError(f"table.arrow has {table.num_rows} rows, expected {meta['rows']}, or lacks a column")
    _array(table, "image_id")
    ids = table.column("image_id").to_pylist()
    row_of = dict(zip(ids, range(len(ids))))
    if len(row_of) != len(ids):
        raise ValueError("table.arrow has an image twice")
    if meta["empty"]:
        if ids:
            raise ValueError("an empty index with rows")
        return Index(table, None, None, {})
    texts = _read_arrow(folder / "references.arrow")
    counts = _read_npy(folder / "counts.npy")
    if counts.shape != (len(ids),) or counts.dtype != np.int64 or int(counts.sum()) != texts.num_rows:
        raise ValueError("the references do not match the rows")
    if len(counts) and counts.min() < 1:
        raise ValueError("an image without references")  # every image has one (an empty one when it has none)
    references = References(_array(texts, "text"), _array(texts, "kind"), counts)
    arrays = {name: _read_npy(folder / f"{name}.npy") for name in (*BleuIndex.ARRAYS, *BleuIndex.ARRAYS_2D)}
    image_ids = _engine_ids(_read_npy(folder / "engine_rows.npy"), ids)
    vocabulary = _array(_read_arrow(folder / "vocabulary.arrow"), "value").to_pylist()
    if "max_order" in key and meta.get("max_order") != key["max_order"]:  # the order searches will ask for
        raise ValueError(f"max_order {meta.get('max_order')!r} is not the key's {key['max_order']}")
    engine = BleuIndex.from_state(arrays, image_ids, vocabulary, meta["max_order"])  # checks its arrays' values
    if len(engine.ref_lens) != texts.num_rows:
        raise ValueError("the engine's texts are not the references")
    return Index(table, references, engine, row_of, _read_visual(folder, meta, len(ids)))


def _engine_ids(rows: np.ndarray, ids: list[str]) -> EngineIds:
    """The engine's image ids: the table's (`ids`, distinct) in engine order. ValueError unless `rows` is a
    permutation of the table's rows, so that every hit's image is one of the table's, once. Row numbers,
    not strings: hashing a million ids to compare them would cost more than the rest of opening the entry."""
    n = len(ids)
    if rows.dtype != np.int64 or rows.shape != (n,):
        raise ValueError(f"engine_rows.npy is {rows.dtype}{rows.shape}, expected int64({n},)")
    if n and (rows.min() < 0 or rows.max() >= n or np.bincount(rows, minlength=n).max() != 1):
        raise ValueError("engine_rows.npy is not a permutation of the table's rows")
    return EngineIds(ids, rows)


class EngineIds(Sequence):
    """The engine's image ids as a view of the table's: a search reads k of them, and gathering a million
    strings into engine order on every open would take longer than checking all the engine's arrays."""

    def __init__(self, ids: list[str], rows: np.ndarray):
        self.ids, self.rows = ids, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        return [self.ids[r] for r in self.rows[i].tolist()] if isinstance(i, slice) else self.ids[self.rows[i]]


def _read_visual(folder: Path, meta: dict, rows: int) -> np.ndarray | None:
    if not meta.get("visual"):
        return None
    visual = _read_npy(folder / "visual.npy")
    if visual.ndim != 2 or visual.shape[0] != rows or visual.dtype != np.dtype("<f2"):
        raise ValueError(f"visual.npy is {visual.dtype} {visual.shape}, expected float16 ({rows}, d)")
    return visual


def _read_npy(path: Path) -> np.ndarray:
    # Copy-on-write: pages are read when touched and shared with the page cache, and the array stays
    # writeable, so the engine's kernels run their compiled (cached) versions (read-only arrays are
    # another numba type: another compilation).
    return np.asarray(np.load(path, mmap_mode="c", allow_pickle=False))


def _read_arrow(path: Path) -> pa.Table:
    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()  # zero-copy: the buffers keep the map


def _array(table: pa.Table, name: str) -> pa.Array:
    column = table.column(name)
    if not pa.types.is_string(column.type):
        raise ValueError(f"{name} is {column.type}, not strings")
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
