"""Benchmark: opening a folder of many large micrographs as a lazy stack.

Writes N (default 200) synthetic 4096 x 4096 float32 MRC files (64 MiB each), then, each time in a fresh Python
process, measures the wall time and the peak resident memory (``ru_maxrss``) of

- ``open_stack(folder)`` (the core: headers only, a lazy dask array),
- the napari reader: ``get_micrograph_reader(folder)(folder)`` producing the Image layer data,
- reading one plane of the stack afterwards (``np.asarray(stack.data[i])``: one memory-mapped file),

and prints the medians over several repeats as a markdown table. Imports are timed separately and are not part
of the figures. Before each repeat the files' pages are dropped from the page cache (``posix_fadvise``
DONTNEED, our files only), so headers are read from disk.

Usage::

    python benchmarks/bench_reader.py                      # 200 files in a temporary folder under /tmp
    python benchmarks/bench_reader.py -n 50 --dir /work/bench_tmp --repeats 5 --keep

Targets: under 1 s and under 300 MB for 200 files.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_files(folder: Path, n: int, size: int, seed: int = 0) -> float:
    """Write ``n`` float32 MRC files of ``size`` x ``size`` pixels quickly (a random tile repeated)."""
    import mrcfile

    rng = np.random.default_rng(seed)
    tile = rng.standard_normal((256, size)).astype(np.float32)
    stats = float(tile.min()), float(tile.max()), float(tile.mean()), float(tile.std())
    width = len(str(n - 1))
    t0 = time.perf_counter()
    for i in range(n):
        with mrcfile.new_mmap(folder / f"mic_{i:0{width}d}.mrc", shape=(size, size), mrc_mode=2,
                              overwrite=True) as mrc:
            shifted = np.roll(tile, i, axis=1)
            for r in range(0, size, tile.shape[0]):
                rows = min(tile.shape[0], size - r)
                mrc.data[r:r + rows] = shifted[:rows]
            mrc.voxel_size = 1.06
            h = mrc.header
            h.dmin, h.dmax, h.dmean, h.rms = stats
    return time.perf_counter() - t0


def drop_cache(folder: Path) -> None:
    """Ask the kernel to forget the cached pages of our files only (no effect on other files)."""
    if not hasattr(os, "posix_fadvise"):
        return
    for p in folder.iterdir():
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(task: str, folder: str) -> dict:
    """Run one measurement in this (fresh) process and return the figures."""
    t0 = time.perf_counter()
    import dask.array  # noqa: F401  (imports are not part of the measurement)

    from napari_pupick._reader import get_micrograph_reader
    from napari_pupick.io import open_stack

    import_s = time.perf_counter() - t0
    rss0 = _maxrss_mb()
    t0 = time.perf_counter()
    if task == "open_stack":
        stack = open_stack(folder)
        data = stack.data
    else:
        reader = get_micrograph_reader(folder)
        data = reader(folder)[0][0]
    wall = time.perf_counter() - t0
    rss1 = _maxrss_mb()
    t0 = time.perf_counter()
    plane = np.asarray(data[data.shape[0] // 2])
    plane_s = time.perf_counter() - t0
    rss2 = _maxrss_mb()
    return {"task": task, "shape": list(data.shape), "import_s": import_s, "wall_s": wall, "rss_before_mb": rss0,
            "rss_after_mb": rss1, "rss_increase_mb": rss1 - rss0, "plane_s": plane_s, "rss_after_plane_mb": rss2,
            "plane_mean": float(plane.mean())}


def run_child(task: str, folder: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", task, "--dir", str(folder)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--n-files", type=int, default=200)
    ap.add_argument("--size", type=int, default=4096, help="micrograph side in pixels [4096]")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=None, help="parent folder for the files [system temp]")
    ap.add_argument("--keep", action="store_true", help="keep the files (and reuse them if present)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, str(args.dir))))
        return 0

    parent = args.dir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    need = args.n_files * (args.size**2 * 4 + 1024)
    free = shutil.disk_usage(parent).free
    folder = parent / f"pupick_bench_{args.n_files}x{args.size}"
    existing = len(list(folder.glob("*.mrc"))) if folder.is_dir() else 0
    if existing != args.n_files and free < need * 1.1:
        print(f"not enough disk in {parent}: need {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free", file=sys.stderr)
        return 1
    try:
        if existing != args.n_files:
            folder.mkdir(exist_ok=True)
            seconds = write_files(folder, args.n_files, args.size)
            print(f"wrote {args.n_files} files of {args.size} x {args.size} float32 ({need / 1e9:.1f} GB) to "
                  f"{folder} in {seconds:.1f} s")
        results: dict = {"open_stack": [], "napari reader": []}
        for _ in range(args.repeats):
            for task in results:
                drop_cache(folder)
                results[task].append(run_child(task, folder))
        med = {k: {f: statistics.median(r[f] for r in v) for f in v[0] if isinstance(v[0][f], float)}
               for k, v in results.items()}
        shape = results["open_stack"][0]["shape"]
        print(f"\n{args.n_files} micrographs of {args.size} x {args.size} float32, stack shape {tuple(shape)}; "
              f"medians of {args.repeats} fresh processes (page cache of the files dropped before each)\n")
        print("| step | wall time (s) | peak RSS increase (MB) | peak RSS after (MB) | then read 1 plane (s) "
              "| peak RSS after plane (MB) | imports before (s) |")
        print("|---|---|---|---|---|---|---|")
        for k, m in med.items():
            print(f"| {k} | {m['wall_s']:.3f} | {m['rss_increase_mb']:.1f} | {m['rss_after_mb']:.0f} | "
                  f"{m['plane_s']:.3f} | {m['rss_after_plane_mb']:.0f} | {m['import_s']:.2f} |")
        worst = max(m["wall_s"] for m in med.values()), max(m["rss_increase_mb"] for m in med.values())
        ok = worst[0] < 1.0 and worst[1] < 300
        print(f"\ntarget < 1 s and < 300 MB: {'met' if ok else 'NOT met'} (worst {worst[0]:.3f} s, "
              f"{worst[1]:.1f} MB)")
    finally:
        if not args.keep and folder.exists():
            shutil.rmtree(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
