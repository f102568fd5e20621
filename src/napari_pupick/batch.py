"""Streaming, resumable batch picking: one model over thousands of micrographs, serially or on dask.distributed.

Each micrograph's picks are written atomically (a temporary file renamed over the target) as soon as they are
known, one coordinate file per micrograph, and a small JSON sidecar in ``<folder>/.pupick/`` records what produced
it: the model's SHA-256, the settings actually used (threshold, radius, margin, TTA, format), the micrograph's
size and modification time, and the size of the coordinate file. A micrograph counts as **complete** when its
coordinate file exists, its sidecar exists, and both agree (same settings, same micrograph, same file size); a
rerun skips complete micrographs and redoes the rest (``overwrite=True`` redoes all). The sidecar is written after
the coordinate file, so a run killed between the two redoes that micrograph.

The combined file (all micrographs in one table) is written at the end by streaming the per-micrograph files one
at a time, so memory is bounded by the micrographs in flight, never by their number.

Engines: serial (default, in this process, no dask.distributed needed) or a ``dask.distributed.Client``: one
task per micrograph, a bounded window of tasks in flight, each worker process loading the model once (cached by
path and checksum). The client writes every file, so a task retried after a lost worker writes nothing twice.
Picks do not depend on the engine, the number of workers or the order of completion.

Nothing here imports Qt or napari; torch and distributed are imported lazily.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from napari_pupick.errors import CoordinateError, PupickError

__all__ = ["BatchItem", "BatchResult", "BatchSettings", "file_sha256", "plan_items", "run_batch",
           "write_combined"]

#: Bumped when the sidecar's meaning changes (older sidecars then count as incomplete).
SIDECAR_VERSION = 1
SIDECAR_DIR = ".pupick"
_EXT = {"star": ".star", "csv": ".csv", "topaz": ".txt", "box": ".box"}
#: This process's Picker of the current run, keyed by (model path, sha256, device, tta): loaded once.
_PICKERS: dict = {}


def file_sha256(path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


@dataclass
class BatchSettings:
    """What determines the picks of one micrograph (resolved values, never None once resolved)."""

    model: str
    model_sha256: str
    threshold: float
    radius: float
    margin: float
    tta: bool
    format: str = "star"
    box_size: float | None = None

    def key(self) -> dict:
        d = {k: getattr(self, k) for k in ("model_sha256", "threshold", "radius", "margin", "tta", "format",
                                           "box_size")}
        d["version"] = SIDECAR_VERSION
        return d


def resolve_settings(model, *, threshold=None, radius=None, margin=None, tta=None, format="star",
                     box_size=None, device: str = "auto") -> BatchSettings:
    """The model's own defaults (calibrated threshold, margin, particle radius, TTA) where a value is None.

    The Picker loaded here is this process's cached one for the run (see :func:`_picker`): a serial run loads
    and hashes the model once."""
    from napari_pupick.pipeline import Picker

    model = Path(model).resolve()
    picker = Picker(model, device=device, tta=tta)
    r = picker.particle_radius if radius is None else float(radius)
    if r is None:
        raise PupickError(f"{model}: the checkpoint has no particle radius; give radius (original pixels)")
    fmt = str(format).lower()
    if fmt not in _EXT:
        raise CoordinateError(f"unknown coordinate format {format!r}; use one of {', '.join(_EXT)}")
    if fmt == "box" and box_size is None:
        box_size = 2 * r
    settings = BatchSettings(model=str(model), model_sha256=file_sha256(model),
                             threshold=picker.threshold if threshold is None else float(threshold),
                             radius=float(r), margin=picker.margin if margin is None else float(margin),
                             tta=bool(picker.tta), format=fmt, box_size=None if box_size is None else float(box_size))
    _PICKERS.clear()
    _PICKERS[(settings.model, settings.model_sha256, str(device), settings.tta)] = picker
    return settings


@dataclass
class BatchItem:
    """One micrograph of a batch: its file, the micrograph name written in the tables, and its output file."""

    path: Path
    name: str
    target: Path
    sidecar: Path


@dataclass
class BatchResult:
    """What a batch run did. ``failed`` holds ``(micrograph path, reason)``; ``timings`` sums seconds spent per
    stage in the tasks (read, prepare, score, extract) and ``write`` on the client."""

    done: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    n_picks: int = 0
    wall_s: float = 0.0
    timings: dict = field(default_factory=dict)
    combined: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        lines = [f"{len(self.done)} done, {len(self.skipped)} skipped (already complete), {len(self.failed)} failed; "
                 f"{self.n_picks} picks written in {self.wall_s:.1f} s"]
        for path, reason in self.failed[:20]:
            lines.append(f"  failed: {path}: {reason}")
        if len(self.failed) > 20:
            lines.append(f"  ... and {len(self.failed) - 20} more failed")
        return "\n".join(lines)


def plan_items(paths: Sequence, folder, fmt: str = "star", suffix: str = "", targets: Sequence | None = None,
               names: Sequence | None = None) -> list[BatchItem]:
    """One :class:`BatchItem` per micrograph: ``<folder>/<name><suffix><ext>`` unless ``targets`` are given
    (e.g. RELION's mirrored paths); sidecars in ``<folder>/.pupick/`` mirroring the targets."""
    from napari_pupick.io import micrograph_name

    folder = Path(folder)
    ext = _EXT[fmt]
    items, seen = [], {}
    for i, p in enumerate(paths):
        p = Path(p)
        name = str(names[i]) if names is not None else micrograph_name(p)
        target = Path(targets[i]) if targets is not None else folder / f"{name}{suffix}{ext}"
        if target in seen:
            raise CoordinateError(f"{p} and {seen[target]} would both write {target}: micrograph names must be "
                                  "unique in one batch")
        seen[target] = p
        try:
            rel = target.relative_to(folder)
        except ValueError:
            rel = Path(target.name)
        items.append(BatchItem(p, name, target, folder / SIDECAR_DIR / (str(rel) + ".json")))
    return items


def _micrograph_stamp(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def is_complete(item: BatchItem, settings: BatchSettings) -> bool:
    """True when the item's coordinate file and sidecar exist and agree with these settings and micrograph."""
    try:
        meta = json.loads(item.sidecar.read_text())
        return (meta.get("settings") == settings.key() and item.target.is_file()
                and meta.get("bytes") == item.target.stat().st_size
                and meta.get("micrograph") == _micrograph_stamp(item.path))
    except (OSError, ValueError):
        return False


def _write_json_atomic(path: Path, obj) -> None:
    from napari_pupick.io.atomic import write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, obj)


def _write_item(item: BatchItem, table: pd.DataFrame, settings: BatchSettings) -> None:
    """The micrograph's coordinate file (atomic, by the io writers), then its sidecar (atomic)."""
    from napari_pupick.io.coords import write_micrograph_coordinates

    item.target.parent.mkdir(parents=True, exist_ok=True)
    table = table.assign(micrograph=item.name)
    write_micrograph_coordinates(table, item.target, format=settings.format, box_size=settings.box_size)
    _write_json_atomic(item.sidecar, {"settings": settings.key(), "micrograph": _micrograph_stamp(item.path),
                                      "bytes": item.target.stat().st_size, "n_picks": len(table),
                                      "source": str(item.path)})


# ---------------------------------------------------------------------------------------------------------------
# The task (runs in this process or on a dask worker)


def _picker(model: str, sha: str, device: str, tta: bool, threads: int | None):
    """This process's Picker for the model, loaded once (keyed by path and checksum)."""
    from napari_pupick.predict import set_threads

    if threads:
        set_threads(threads)
    key = (model, sha, device, tta)
    picker = _PICKERS.get(key)
    if picker is None:
        from napari_pupick.pipeline import Picker

        seen = file_sha256(model)
        if seen != sha:
            raise PupickError(f"{model}: the model file here (sha256 {seen[:12]}) differs from the one the run "
                              f"was started with ({sha[:12]}): every worker must read the same file")
        _PICKERS.clear()  # one model at a time per process
        picker = _PICKERS[key] = Picker(model, device=device, tta=tta)
    return picker


def pick_task(path: str, name: str, settings: BatchSettings, device: str = "auto", threads: int | None = 1) -> dict:
    """Read, score and extract one micrograph. Never raises for a bad micrograph: returns
    ``{"status": "failed", "reason": ...}``; on success ``{"status": "done", "table": picks, "timings": ...}``."""
    timings = {}
    try:
        from napari_pupick.io import read_micrograph

        picker = _picker(settings.model, settings.model_sha256, str(device), settings.tta, threads)
        t0 = time.perf_counter()
        raw = read_micrograph(path)
        t1 = time.perf_counter()
        prepared = picker.prepare(raw)
        del raw
        t2 = time.perf_counter()
        logits = picker.score(prepared, prepared=True)
        t3 = time.perf_counter()
        table = picker.extract(logits, name, radius=settings.radius, threshold=settings.threshold,
                               margin=settings.margin)
        t4 = time.perf_counter()
        timings = {"read": t1 - t0, "prepare": t2 - t1, "score": t3 - t2, "extract": t4 - t3}
    except Exception as exc:  # a corrupt micrograph among thousands is reported, never the end of the run
        msg = str(exc)
        if str(path) not in msg:
            msg = f"{type(exc).__name__}: {msg}"
        return {"status": "failed", "reason": msg, "timings": timings}
    return {"status": "done", "table": table, "timings": timings}


# ---------------------------------------------------------------------------------------------------------------
# Engines


def _serial(todo, settings, device, threads):
    for item in todo:
        yield item, pick_task(str(item.path), item.name, settings, device, threads)


def _distributed(todo, settings, device, threads, client, retries, window):
    from distributed import as_completed

    pending = list(reversed(todo))
    by_key, running = {}, as_completed()
    run = secrets.token_hex(4)

    def submit():
        item = pending.pop()
        # one key per micrograph and run: a task the scheduler reruns after a lost worker keeps its key (one result,
        # never a duplicate); the run's token keeps a resumed run's tasks apart from the cancelled tasks of an
        # interrupted run on the same client, which the scheduler may still be forgetting
        key = f"pupick-{run}-" + hashlib.sha1(f"{settings.model_sha256}|{item.path}|{item.target}".encode()).hexdigest()
        fut = client.submit(pick_task, str(item.path), item.name, settings, device, threads, key=key,
                            retries=retries, pure=False)
        by_key[fut.key] = item
        running.add(fut)

    for _ in range(min(window, len(pending))):
        submit()
    try:
        for fut in running:
            item = by_key.pop(fut.key)
            try:
                result = fut.result()
            except Exception as exc:  # KilledWorker after repeated losses, or a task that escaped its own guard
                result = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}", "timings": {}}
            fut.release()
            if pending:
                submit()
            yield item, result
    finally:
        for fut in list(running.futures):
            fut.cancel()


def run_batch(model, paths: Sequence, folder, *, combined=None, format: str = "star", suffix: str = "",
              threshold=None, radius=None, margin=None, tta=None, box_size=None, overwrite: bool = False,
              device: str = "auto", threads: int | None = 1, client=None, retries: int = 2,
              window: int | None = None, progress: bool = False, targets: Sequence | None = None,
              names: Sequence | None = None, on_result: Callable | None = None,
              micrograph_ext: str | None = None) -> BatchResult:
    """Pick every micrograph in ``paths`` with ``model``, writing one file per micrograph into ``folder``.

    Parameters
    ----------
    model : checkpoint file (read by every worker: it must be reachable there, same bytes).
    paths : micrograph files.
    folder : where the per-micrograph files and the ``.pupick/`` sidecars go.
    combined : also write one file for all micrographs here at the end (format from its extension), streamed
        from the per-micrograph files; None: none.
    format : per-micrograph format: star (default), csv, topaz, box.
    threshold, radius, margin, tta : None (default): the model's own (calibrated threshold, margin, particle
        radius, TTA as calibrated).
    overwrite : redo micrographs whose output is complete.
    client : a ``dask.distributed.Client`` (None: serial, in this process).
    retries : retries of a task whose worker was lost or that raised (distributed only).
    window : tasks in flight at most (default: 4 per worker thread).
    targets, names : explicit per-micrograph output files and micrograph names (RELION's layout).
    on_result : called as ``on_result(item, result)`` after each micrograph (progress hooks, tests).
    micrograph_ext : extension of the names in a combined STAR file (None: each micrograph file's own).

    Returns
    -------
    BatchResult (``result.ok`` is False when any micrograph failed).
    """
    t_start = time.perf_counter()
    settings = resolve_settings(model, threshold=threshold, radius=radius, margin=margin, tta=tta, format=format,
                                box_size=box_size, device=str(device))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    items = plan_items(paths, folder, settings.format, suffix, targets, names)
    result = BatchResult()
    todo = []
    for item in items:
        if not overwrite and is_complete(item, settings):
            result.skipped.append(item.path)
        else:
            todo.append(item)
    if client is None:
        stream = _serial(todo, settings, device, threads)
    else:
        if window is None:
            window = 4 * max(1, sum(client.nthreads().values()))
        stream = _distributed(todo, settings, device, threads, client, retries, window)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), initial=len(result.skipped), desc="extract", unit="mic")
    totals = {"read": 0.0, "prepare": 0.0, "score": 0.0, "extract": 0.0, "write": 0.0}
    try:
        for item, res in stream:
            for k, v in res.get("timings", {}).items():
                totals[k] += v
            if res["status"] == "done":
                t0 = time.perf_counter()
                try:
                    _write_item(item, res["table"], settings)
                    result.done.append(item.path)
                    result.n_picks += len(res["table"])
                except (OSError, PupickError) as exc:
                    result.failed.append((item.path, f"writing {item.target}: {exc}"))
                totals["write"] += time.perf_counter() - t0
            else:
                result.failed.append((item.path, res["reason"]))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(done=len(result.done), failed=len(result.failed), refresh=False)
            if on_result is not None:
                on_result(item, res)
    finally:
        if bar is not None:
            bar.close()
    if combined is not None:
        result.combined = write_combined(items, combined, micrograph_ext=micrograph_ext,
                                         fmt_items=settings.format)
    result.timings = totals
    result.wall_s = time.perf_counter() - t_start
    _write_json_atomic(folder / SIDECAR_DIR / "last_run.json",
                       {"done": len(result.done), "skipped": len(result.skipped),
                        "failed": [[str(p), r] for p, r in result.failed], "wall_s": result.wall_s,
                        "timings": totals})
    return result


def write_combined(items: Sequence[BatchItem], path, *, micrograph_ext: str | None = None,
                   fmt_items: str = "star") -> Path:
    """One coordinate file for every complete micrograph of ``items``, in their order, streamed: each
    per-micrograph file is read, appended to a temporary file and dropped, then the temporary file is renamed
    over ``path``. Formats: star, csv, topaz (from the extension of ``path``); the text of each part is what
    :func:`napari_pupick.io.write_coordinates` writes for it (names protected the same way). ``micrograph_ext``:
    the extension of STAR ``rlnMicrographName`` values; None (default): each micrograph file's own."""
    from napari_pupick.io import guess_format, read_coordinates
    from napari_pupick.io.coords import _empty_table, format_coordinates

    path = Path(path)
    fmt = guess_format(path)
    if fmt == "box":
        raise CoordinateError(f"{path}: an EMAN .box file holds one micrograph; the per-micrograph files are the "
                              "output")
    path.parent.mkdir(parents=True, exist_ok=True)
    from napari_pupick.io.atomic import atomic_write

    def write(tmp):
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            first = True
            for item in items:
                if not (item.target.is_file() and item.sidecar.is_file()):
                    continue
                table = read_coordinates(item.target, format=fmt_items).assign(micrograph=item.name)
                ext = Path(item.path).suffix if micrograph_ext is None else micrograph_ext
                fh.write(format_coordinates(table, fmt, header=first, has_score=True, micrograph_ext=ext))
                first = False
            if first:
                fh.write(format_coordinates(_empty_table(), fmt, has_score=True))

    return atomic_write([(path, write)])[0]


def have_distributed() -> bool:
    """Whether dask.distributed can be imported (found without importing it)."""
    import importlib.util

    return importlib.util.find_spec("distributed") is not None


def require_distributed() -> None:
    """Raise PupickError unless dask.distributed is installed."""
    if not have_distributed():
        raise PupickError("--workers and --scheduler need dask.distributed, which is not installed: pip install "
                          "'napari-pupick[distributed]'")


def start_client(workers: int | None = None, scheduler: str | None = None, threads_per_worker: int = 1):
    """A ``dask.distributed.Client``: on a new ``LocalCluster`` of ``workers`` processes, or joined to the
    scheduler at ``scheduler``. Raises PupickError when dask.distributed is not installed."""
    require_distributed()
    from distributed import Client, LocalCluster

    if scheduler:
        return Client(scheduler)
    cluster = LocalCluster(n_workers=int(workers), threads_per_worker=threads_per_worker, processes=True,
                           dashboard_address=None)
    client = Client(cluster)
    client._pupick_cluster = cluster
    return client


def close_client(client) -> None:
    cluster = getattr(client, "_pupick_cluster", None)
    client.close()
    if cluster is not None:
        cluster.close()
